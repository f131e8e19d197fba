"""The training-run state machine: the job rules of api/core/jobs.py with a lease suited to hours-long work.

queued -> running (claim: attempt + 1, new fencing token, lease) -> succeeded | failed | cancelled;
running with an expired lease -> queued again (re-published; the next attempt resumes from the last checkpoint
in object storage) or failed after the attempt limit. A stale trainer (token moved on) changes nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.core.jobs import ACTIVE, Claim, InvalidTransition
from api.core.models import JobStatus as RunStatus
from api.core.models import TrainingRun, utcnow

__all__ = ["DATASET_LAYOUTS", "Claim", "InvalidTransition", "RunNotFound", "RunStatus", "checkpoint_prefix"]

# API layout names -> model.data layouts; "brats" takes every BraTS naming (2020, 2021, 2023, BraTS-Toolkit)
DATASET_LAYOUTS = {"brats": "auto", "wmh": "wmh", "ixi": "ixi", "auto": "auto", "brats2020": "brats2020",
                   "brats2021": "brats2021", "brats2023": "brats2023", "brats-toolkit": "brats-toolkit"}


def checkpoint_prefix(run_id: str) -> str:
    """Where a run's resumable stage checkpoints live in object storage."""
    return f"training-runs/{run_id}/checkpoint/"


class RunNotFound(LookupError):
    """No training run with this id."""


def claim(session: Session, run_id: str, *, worker_id: str, lease_seconds: int, max_attempts: int) -> Claim | None:
    """Atomically take a queued run; None when another delivery holds it or it is finished."""
    token, now = str(uuid.uuid4()), utcnow()
    result = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.status == RunStatus.queued,
               TrainingRun.cancel_requested.is_(False), TrainingRun.attempts < max_attempts)
        .values(status=RunStatus.running, attempts=TrainingRun.attempts + 1, fencing_token=token, worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds), started_at=func.coalesce(
                    TrainingRun.started_at, now), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    attempt = session.execute(select(TrainingRun.attempts).where(TrainingRun.id == run_id)).scalar_one()
    return Claim(job_id=run_id, attempt=attempt, token=token)


def _fenced(c: Claim):  # type: ignore[no-untyped-def]
    return update(TrainingRun).where(TrainingRun.id == c.job_id, TrainingRun.fencing_token == c.token,
                                     TrainingRun.status == RunStatus.running)


def _apply(session: Session, stmt: Any) -> bool:
    result = session.execute(stmt.execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def renew(session: Session, c: Claim, *, lease_seconds: int, **values: Any) -> bool:
    """Extend the lease and record progress (stage, progress, history, log_tail, checkpoint); False when the claim
    is stale or cancel was requested."""
    values |= {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds), "updated_at": utcnow()}
    if "progress" in values:
        values["progress"] = max(0, min(100, int(values["progress"])))
    if not _apply(session, _fenced(c).values(**values)):
        return False
    return not session.execute(select(TrainingRun.cancel_requested).where(TrainingRun.id == c.job_id)).scalar_one()


def complete(session: Session, c: Claim, *, model_version: str, **values: Any) -> bool:
    now = utcnow()
    return _apply(session, _fenced(c).values(status=RunStatus.succeeded, progress=100, model_version=model_version,
                                             finished_at=now, updated_at=now, lease_expires_at=None, **values))


def fail(session: Session, c: Claim, *, code: str, message: str, retry: bool = False, **values: Any) -> bool:
    """End the attempt: failed with a code, or back to queued when ``retry`` (attempts remaining)."""
    now = utcnow()
    values |= {"updated_at": now, "lease_expires_at": None, "fencing_token": None, "error_code": code,
               "error_message": message}  # nosec B105 - fencing_token None: not a password
    values |= {"status": RunStatus.queued} if retry else {"status": RunStatus.failed, "finished_at": now}
    return _apply(session, _fenced(c).values(**values))


def mark_cancelled(session: Session, c: Claim, **values: Any) -> bool:
    now = utcnow()
    return _apply(session, _fenced(c).values(status=RunStatus.cancelled, finished_at=now, updated_at=now,
                                             lease_expires_at=None, fencing_token=None, **values))


def request_cancel(session: Session, run: TrainingRun) -> TrainingRun:
    """Cancel a queued run at once; a running one is stopped by its worker within a second (process group)."""
    if RunStatus(run.status).finished:
        raise InvalidTransition(f"training run {run.id} is already {run.status}")
    now = utcnow()
    session.execute(update(TrainingRun).where(TrainingRun.id == run.id, TrainingRun.status.in_(ACTIVE))
                    .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))
    session.execute(update(TrainingRun).where(TrainingRun.id == run.id, TrainingRun.status == RunStatus.queued)
                    .values(status=RunStatus.cancelled, finished_at=now).execution_options(synchronize_session=False))
    session.commit()
    session.refresh(run)
    return run


def reap_expired(session: Session, *, max_attempts: int, now: datetime | None = None) -> tuple[list[str], list[str]]:
    """Running runs whose lease expired (their worker died): re-queue for re-publishing, or fail at the limit."""
    now = now or utcnow()
    expired = session.execute(
        select(TrainingRun.id, TrainingRun.attempts, TrainingRun.fencing_token, TrainingRun.cancel_requested)
        .where(TrainingRun.status == RunStatus.running, TrainingRun.lease_expires_at < now)
    ).all()
    requeued: list[str] = []
    failed: list[str] = []
    for run_id, attempts, token, cancel in expired:
        guard = update(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.fencing_token == token,
                                          TrainingRun.status == RunStatus.running)
        if cancel:
            values: dict[str, Any] = {"status": RunStatus.cancelled, "finished_at": now}
        elif attempts >= max_attempts:
            values = {"status": RunStatus.failed, "finished_at": now, "error_code": "worker_lost",
                      "error_message": f"the training worker stopped answering on each of {attempts} attempts"}
        else:
            values = {"status": RunStatus.queued}
        values |= {"fencing_token": None, "lease_expires_at": None, "updated_at": now}  # nosec B105
        if session.execute(guard.values(**values).execution_options(synchronize_session=False)).rowcount == 1:  # type: ignore[attr-defined]
            (requeued if values["status"] == RunStatus.queued else failed).append(run_id)
    session.commit()
    return requeued, failed


def stale_queued(session: Session, *, older_than: timedelta, now: datetime | None = None) -> list[str]:
    """Queued runs untouched for ``older_than``: their message may be lost; re-publish them."""
    cutoff = (now or utcnow()) - older_than
    ids = list(session.execute(select(TrainingRun.id).where(TrainingRun.status == RunStatus.queued,
                                                            TrainingRun.updated_at < cutoff)).scalars())
    if ids:
        session.execute(update(TrainingRun).where(TrainingRun.id.in_(ids), TrainingRun.status == RunStatus.queued)
                        .values(updated_at=utcnow()).execution_options(synchronize_session=False))
        session.commit()
    return ids
