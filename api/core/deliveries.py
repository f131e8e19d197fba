"""Deliveries of a job's DICOM result to configured nodes (``deliver_to``); every transition is one conditional UPDATE.

pending (next_attempt_at None: the job has not succeeded yet) -> the job succeeds: due now, published ->
an attempt claims it (attempts + 1, a lease) -> delivered (sent and verified) | failed (refused by the node, or the
attempt budget is spent) | pending again with the error and next_attempt_at = now + backoff. The reaper publishes
due deliveries; a lost message or a worker killed mid-attempt only delays the next attempt. None of this touches
the job's own status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from api.core.errors import ProblemError
from api.core.models import Delivery, DeliveryStatus, Job, JobStatus, utcnow
from api.core.settings import DicomSettings

REPUBLISH_SECONDS = 60  # a published delivery not claimed by then is published again (its message may be lost)


def node_names(raw: str | None) -> list[str]:
    """``NAME[,NAME]`` -> node names; order kept, duplicates dropped."""
    return list(dict.fromkeys(n.strip() for n in (raw or "").split(",") if n.strip()))


def require_nodes(names: list[str], cfg: DicomSettings, field: str) -> None:
    """422 ``unknown_node`` naming every one of ``names`` (given in the request's ``field``) that is not a
    configured DICOM node."""
    unknown = [n for n in names if n not in cfg.nodes]
    if unknown:
        raise ProblemError(422, "unknown_node", f"unknown DICOM node(s) {', '.join(unknown)} (configured: "
                                                f"{', '.join(cfg.nodes) or 'none'}; see MSGLDM_DICOM__NODES)",
                           field=field)


def for_job(session: Session, job_id: str) -> list[Delivery]:
    return list(session.execute(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.node)).scalars())


def _published(session: Session, query, now: datetime) -> list[str]:  # type: ignore[no-untyped-def]
    """The ids ``query`` selects, each marked published (its next attempt in REPUBLISH_SECONDS, so that the
    reaper leaves it alone for a while); committed."""
    ids = list(session.execute(query).scalars())
    if ids:
        session.execute(update(Delivery).where(Delivery.id.in_(ids))
                        .values(next_attempt_at=now + timedelta(seconds=REPUBLISH_SECONDS), updated_at=now)
                        .execution_options(synchronize_session=False))
    session.commit()
    return ids


def make_due(session: Session, job_id: str) -> list[str]:
    """The job succeeded: its pending deliveries are due now (ids, to publish); marks them published."""
    return _published(session, select(Delivery.id).where(
        Delivery.job_id == job_id, Delivery.status == DeliveryStatus.pending), utcnow())


def due(session: Session, now: datetime | None = None) -> list[str]:
    """Pending deliveries of succeeded jobs whose next attempt is due (and not held by a live attempt); each is
    marked published."""
    now = now or utcnow()
    return _published(session, select(Delivery.id).join(Job, Job.id == Delivery.job_id).where(
        Delivery.status == DeliveryStatus.pending, Delivery.next_attempt_at <= now, Job.status == JobStatus.succeeded,
        or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now)), now)


@dataclass(frozen=True)
class Attempt:
    delivery_id: str
    job_id: str
    node: str
    attempt: int


def claim(session: Session, delivery_id: str, *, lease_seconds: int) -> Attempt | None:
    """Take a pending delivery of a succeeded job for one attempt; None when delivered, failed or held elsewhere."""
    now = utcnow()
    job_ok = select(Job.id).where(Job.id == Delivery.job_id, Job.status == JobStatus.succeeded).exists()
    result = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.pending, job_ok,
               or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now))
        # an attempt that dies with its worker is published again by the reaper when its lease ends
        .values(attempts=Delivery.attempts + 1, lease_expires_at=now + timedelta(seconds=lease_seconds),
                next_attempt_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .execution_options(synchronize_session=False))
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = session.get(Delivery, delivery_id)
    assert row is not None  # nosec B101 - just updated
    session.refresh(row)
    return Attempt(row.id, row.job_id, row.node, row.attempts)


def _finish(session: Session, a: Attempt, **values: object) -> bool:
    now = utcnow()
    result = session.execute(
        update(Delivery).where(Delivery.id == a.delivery_id, Delivery.attempts == a.attempt,
                               Delivery.status == DeliveryStatus.pending)
        .values(lease_expires_at=None, updated_at=now, **values).execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def delivered(session: Session, a: Attempt, *, instances: int) -> bool:
    return _finish(session, a, status=DeliveryStatus.delivered, error=None, instances=instances,
                   verified_at=utcnow(), next_attempt_at=None)


def failed_attempt(session: Session, a: Attempt, *, error: str, permanent: bool, cfg: DicomSettings) -> str:
    """Record a failed attempt: failed for good (refused, or the budget spent) or pending with the next attempt's
    time (exponential backoff). Returns the new status."""
    if permanent or a.attempt >= cfg.delivery_max_attempts:
        _finish(session, a, status=DeliveryStatus.failed, error=error[:4000], next_attempt_at=None)
        return DeliveryStatus.failed
    delay = min(cfg.delivery_backoff_max_seconds, cfg.delivery_backoff_seconds * 2 ** (a.attempt - 1))
    _finish(session, a, error=error[:4000], next_attempt_at=utcnow() + timedelta(seconds=delay))
    return DeliveryStatus.pending


def redeliver(session: Session, job: Job, node: str) -> Delivery:
    """An admin sends a job's result to a node again (a new delivery row for a node not asked before); returns the
    row, due now: the caller publishes it."""
    row = session.execute(select(Delivery).where(Delivery.job_id == job.id, Delivery.node == node)
                          ).scalar_one_or_none()
    now = utcnow()
    if row is None:
        row = Delivery(job_id=job.id, node=node)
        session.add(row)
    row.status, row.attempts, row.error, row.verified_at, row.lease_expires_at = (
        DeliveryStatus.pending, 0, None, None, None)
    row.next_attempt_at, row.updated_at = now + timedelta(seconds=REPUBLISH_SECONDS), now
    session.commit()
    return row
