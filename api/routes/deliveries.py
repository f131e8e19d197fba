"""Admin: send a job's DICOM result to a configured node again (docs/pacs.md)."""

from __future__ import annotations

from fastapi import APIRouter

from api.auth import require
from api.core import audit, deliveries
from api.core import results as result_names
from api.core.errors import ProblemError
from api.core.models import ApiKey, JobStatus
from api.core.queue import publish_delivery
from api.core.settings import get_settings
from api.deps import SessionDep
from api.routes.jobs import NOT_FOUND, to_public, visible_job
from api.schemas import PROBLEM_RESPONSES, JobPublic, Problem

router = APIRouter(prefix="/api/v1/admin/jobs", tags=["admin"])


@router.post("/{job_id}/deliveries/{node}", response_model=JobPublic, status_code=202, responses={
    **PROBLEM_RESPONSES, **NOT_FOUND,
    409: {"model": Problem, "description": "the job has not succeeded (`job_not_succeeded`)"},
    422: {"model": Problem, "description": "the node is not configured (`unknown_node`)"}})
def redeliver(job_id: str, node: str, session: SessionDep, key: ApiKey = require()) -> JobPublic:
    """Send the job's DICOM result to ``node`` (again): the delivery restarts with a fresh attempt budget. The same
    SOP Instance UIDs are sent, so the node keeps one copy."""
    job = visible_job(session, key, job_id)
    deliveries.require_nodes([node], get_settings().dicom, "node")
    if job.status != JobStatus.succeeded or not any(result_names.kind_of(n).kind == "dicom" for n in job.results):
        raise ProblemError(409, "job_not_succeeded", f"job {job_id} is {job.status} and has no DICOM result to send")
    row = deliveries.redeliver(session, job, node)
    publish_delivery(row.id)
    audit.record(session, key, "job.redeliver", "job", job.id, {"node": node})
    return to_public(session, job)
