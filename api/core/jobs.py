"""The job state machine, shared by API, worker and reaper; every transition is one conditional UPDATE.

queued -> running (claim: attempt + 1, new fencing token, lease) -> succeeded | failed | cancelled;
running with an expired lease -> queued again (re-published) or failed after the attempt limit.
A worker whose fencing token no longer matches (its lease expired and the job moved on) changes nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.core.models import Job, JobStatus, utcnow

ACTIVE = (JobStatus.queued, JobStatus.running)


class JobNotFound(LookupError):
    """No job with this id (or not one the caller may see)."""


class InvalidTransition(RuntimeError):
    """The job is not in a state that allows this operation."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    attempt: int
    token: str


def claim(session: Session, job_id: str, *, worker_id: str, lease_seconds: int, max_attempts: int) -> Claim | None:
    """Atomically take a queued job; None when another delivery already holds it or it is finished."""
    token = str(uuid.uuid4())
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued, Job.cancel_requested.is_(False),
               Job.attempts < max_attempts)
        .values(status=JobStatus.running, attempts=Job.attempts + 1, fencing_token=token, worker_id=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds), phase="starting", progress=0,
                started_at=func.coalesce(Job.started_at, now), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    attempt = session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()
    return Claim(job_id=job_id, attempt=attempt, token=token)


def _fenced(job_id: str, token: str):  # type: ignore[no-untyped-def]
    return update(Job).where(Job.id == job_id, Job.fencing_token == token, Job.status == JobStatus.running)


def renew(session: Session, c: Claim, *, lease_seconds: int, phase: str | None = None,
          progress: int | None = None, model_version: str | None = None) -> bool:
    """Extend the lease (and record progress); False when the claim is stale or cancel was requested."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds), "updated_at": utcnow()}
    if phase is not None:
        values["phase"] = phase
    if progress is not None:
        values["progress"] = max(0, min(100, progress))
    if model_version is not None:
        values["model_version"] = model_version
    result = session.execute(_fenced(c.job_id, c.token).values(**values).execution_options(synchronize_session=False))
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    return not session.execute(select(Job.cancel_requested).where(Job.id == c.job_id)).scalar_one()


def complete(session: Session, c: Claim, *, results: dict[str, str], model_version: str) -> bool:
    """Mark succeeded with its results; False (and nothing changed) when the claim is stale."""
    now = utcnow()
    result = session.execute(
        _fenced(c.job_id, c.token)
        .values(status=JobStatus.succeeded, phase="done", progress=100, results=results,
                model_version=model_version, finished_at=now, updated_at=now, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def fail(session: Session, c: Claim, *, code: str, message: str, retry: bool = False) -> bool:
    """End the attempt: failed with a code, or back to queued when ``retry`` and attempts remain."""
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now, "lease_expires_at": None, "fencing_token": None}  # nosec B105
    if retry:
        values |= {"status": JobStatus.queued, "phase": "queued", "error_code": code, "error_message": message}
    else:
        values |= {"status": JobStatus.failed, "phase": "failed", "error_code": code, "error_message": message,
                   "finished_at": now}
    result = session.execute(_fenced(c.job_id, c.token).values(**values).execution_options(synchronize_session=False))
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def mark_cancelled(session: Session, c: Claim) -> bool:
    now = utcnow()
    result = session.execute(
        _fenced(c.job_id, c.token)
        .values(status=JobStatus.cancelled, phase="cancelled", finished_at=now, updated_at=now,
                lease_expires_at=None, fencing_token=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next diffusion step."""
    if JobStatus(job.status).finished:
        raise InvalidTransition(f"job {job.id} is already {job.status}")
    now = utcnow()
    session.execute(update(Job).where(Job.id == job.id, Job.status.in_(ACTIVE))
                    .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))
    session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.queued)
                    .values(status=JobStatus.cancelled, phase="cancelled", finished_at=now)
                    .execution_options(synchronize_session=False))
    session.commit()
    session.refresh(job)
    return job


def reset_for_retry(session: Session, job: Job) -> Job:
    """A failed or cancelled job goes back to the queue with a fresh attempt budget."""
    if job.status not in (JobStatus.failed, JobStatus.cancelled):
        raise InvalidTransition(f"only failed or cancelled jobs can be retried; job {job.id} is {job.status}")
    job.status, job.phase, job.progress = JobStatus.queued, "queued", 0
    job.attempts, job.cancel_requested = 0, False
    job.error_code = job.error_message = None
    job.finished_at = job.started_at = None
    job.results = {}
    session.commit()
    return job


def reap_expired(session: Session, *, max_attempts: int, now: datetime | None = None) -> tuple[list[str], list[str]]:
    """Running jobs whose lease expired: re-queue (returned for re-publishing) or fail after the attempt limit."""
    now = now or utcnow()
    expired = session.execute(
        select(Job.id, Job.attempts, Job.fencing_token, Job.cancel_requested)
        .where(Job.status == JobStatus.running, Job.lease_expires_at < now)
    ).all()
    requeued: list[str] = []
    failed: list[str] = []
    for job_id, attempts, token, cancel in expired:
        guard = update(Job).where(Job.id == job_id, Job.fencing_token == token, Job.status == JobStatus.running)
        if cancel:
            values: dict[str, Any] = {"status": JobStatus.cancelled, "phase": "cancelled", "finished_at": now}
        elif attempts >= max_attempts:
            values = {"status": JobStatus.failed, "phase": "failed", "finished_at": now, "error_code": "worker_lost",
                      "error_message": f"the worker stopped answering on each of {attempts} attempts"}
        else:
            values = {"status": JobStatus.queued, "phase": "queued"}
        values |= {"fencing_token": None, "lease_expires_at": None, "updated_at": now}  # nosec B105
        if session.execute(guard.values(**values).execution_options(synchronize_session=False)).rowcount == 1:  # type: ignore[attr-defined]
            (requeued if values["status"] == JobStatus.queued else failed).append(job_id)
    session.commit()
    return requeued, failed


def stale_queued(session: Session, *, older_than: timedelta, now: datetime | None = None) -> list[str]:
    """Queued jobs untouched for ``older_than``: their message may be lost (broker restart); re-publish them."""
    cutoff = (now or utcnow()) - older_than
    ids = session.execute(select(Job.id).where(Job.status == JobStatus.queued, Job.updated_at < cutoff)).scalars().all()
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), Job.status == JobStatus.queued)
                        .values(updated_at=utcnow()).execution_options(synchronize_session=False))
        session.commit()
    return list(ids)


def queue_position(session: Session, job: Job) -> int | None:
    """How many queued jobs are ahead of this one (0: next), None when not queued."""
    if job.status != JobStatus.queued:
        return None
    return session.execute(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.queued, Job.created_at < job.created_at)
    ).scalar_one()
