"""Jobs: the shared lease state machine (``api/core/leases.py``) over the ``job`` table, plus what only jobs do
(retry with a fresh attempt budget, queue position). API, worker and reaper use these functions.
"""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from api.core.errors import NotFound
from api.core.leases import ACTIVE, Claim, InvalidTransition, Leases
from api.core.models import Job, JobStatus

__all__ = ["ACTIVE", "Claim", "InvalidTransition", "JobNotFound", "claim", "complete", "fail", "mark_cancelled",
           "queue_position", "reap_expired", "renew", "request_cancel", "reset_for_retry", "stale_queued"]

LEASES = Leases(Job, "job")
claim, renew, complete, fail = LEASES.claim, LEASES.renew, LEASES.complete, LEASES.fail
mark_cancelled, request_cancel = LEASES.mark_cancelled, LEASES.request_cancel
reap_expired, stale_queued = LEASES.reap_expired, LEASES.stale_queued


class JobNotFound(NotFound):
    """No job with this id (or not one the caller may see)."""

    code = "job_not_found"


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


# Built once, like api/core/keys.py's lookup: the status poll runs it on every request.
_AHEAD = select(func.count()).select_from(Job).where(Job.status == JobStatus.queued,
                                                     Job.created_at < bindparam("created_at"))


def queue_position(session: Session, job: Job) -> int | None:
    """How many queued jobs are ahead of this one (0: next), None when not queued."""
    if job.status != JobStatus.queued:
        return None
    return session.execute(_AHEAD, {"created_at": job.created_at}).scalar_one()
