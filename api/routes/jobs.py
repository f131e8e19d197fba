"""Jobs: status, listing, results, cancel, retry."""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import KeyDep, current_key, require
from api.core import audit, deliveries
from api.core import jobs as job_states
from api.core import results as result_names
from api.core.db import get_sessionmaker
from api.core.errors import ProblemError
from api.core.jobs import JobNotFound
from api.core.models import ApiKey, Job, JobStatus, Role
from api.core.queue import publish_synthesis
from api.core.settings import get_settings
from api.core.storage import Storage
from api.deps import SessionDep, StorageDep
from api.pagination import newest_first
from api.schemas import (
    JOB_EXAMPLE,
    PROBLEM_RESPONSES,
    DeliveryPublic,
    JobError,
    JobList,
    JobPublic,
    Problem,
    ResultKindPublic,
)

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "no such job (or not yours)"}}
MEDIA_TYPES = {".nii.gz": "application/gzip", ".json": "application/json", ".zip": "application/zip",
               ".png": "image/png", ".html": "text/html"}


def visible_job(session: Session, key: ApiKey, job_id: str) -> Job:
    """The job, if this key may see it: integrators see their own jobs only (others are 404, not 403)."""
    job = session.get(Job, job_id)
    if job is None or (key.role == Role.integrator and job.owner_id != key.id):
        raise JobNotFound(f"no job {job_id}")
    return job


def to_public(session: Session, job: Job) -> JobPublic:
    base = f"/api/v1/jobs/{job.id}"
    return JobPublic(
        id=job.id, status=job.status, phase=job.phase, progress=job.progress,
        queue_position=job_states.queue_position(session, job), attempts=job.attempts,
        model_version=job.model_version, targets=job.targets, inputs=list(job.inputs), formats=job.formats,
        steps=job.steps, seed=job.seed, samples=job.samples, preprocess=job.preprocess or "auto",
        output_grid=job.output_grid or "reference", created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at,
        error=JobError(code=job.error_code, message=job.error_message or "")
        if job.status == JobStatus.failed and job.error_code else None,
        results={name: f"{base}/results/{name}" for name in job.results},
        result_kinds={name: ResultKindPublic(**asdict(result_names.kind_of(name))) for name in job.results},
        source=job.source,
        deliveries=[DeliveryPublic(node=d.node, status=d.status, attempts=d.attempts, error=d.error,
                                   instances=d.instances, verified_at=d.verified_at)
                    for d in deliveries.for_job(session, job.id)]
        if "dicom" in (job.formats or []) else [],  # deliveries need the DICOM result: no query for the others
    )


@router.get("", response_model=JobList, responses=PROBLEM_RESPONSES)
def list_jobs(session: SessionDep, key: KeyDep,
              status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None) -> JobList:
    """Jobs, newest first; integrators see their own."""
    query = select(Job)
    if key.role == Role.integrator:
        query = query.where(Job.owner_id == key.id)
    if status is not None:
        query = query.where(Job.status == status)
    page, next_cursor = newest_first(session, query, Job, limit=limit, cursor=cursor)
    return JobList(items=[to_public(session, j) for j in page], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses={**PROBLEM_RESPONSES, **NOT_FOUND},
            openapi_extra={"responses": {"200": {"content": {"application/json": {"example": JOB_EXAMPLE}}}}})
async def get_job(job_id: str, request: Request) -> JobPublic:
    """A job's state, progress, queue position and result links."""
    limiter = _status_threads(get_settings().api.status_threads)
    return await anyio.to_thread.run_sync(_job_status, request, job_id, limiter=limiter)


# The status poll is the API's hot path (every client polls it): the session, the key check, the job and its queue
# position run in one thread-pool hop (a sync dependency or endpoint is a hop each: four), on a few threads of its
# own (more threads only contend for the GIL). docs/benchmarks.md section 3 has the measurements.
@lru_cache
def _status_threads(threads: int) -> anyio.CapacityLimiter:
    return anyio.CapacityLimiter(threads)


def _job_status(request: Request, job_id: str) -> JobPublic:
    with get_sessionmaker()() as session:
        key = current_key(request, session)
        job = visible_job(session, key, job_id)
        audit.record_view(session, key, job.id)
        return to_public(session, job)


@router.get("/{job_id}/results/{name}", responses={
    **PROBLEM_RESPONSES, **NOT_FOUND,
    200: {"content": {"application/gzip": {}, "application/json": {}}, "description": "the result file"}})
async def get_result(job_id: str, name: str, session: SessionDep, storage: StorageDep, key: KeyDep
                     ) -> StreamingResponse:
    """Download one result: ``{modality}.nii.gz`` or ``record.json``."""
    job = visible_job(session, key, job_id)
    obj_key = job.results.get(name)
    if obj_key is None:
        raise ProblemError(404, "result_not_found", f"job {job_id} has no result {name!r}"
                           + ("" if job.status == JobStatus.succeeded else f" (the job is {job.status})"))
    await run_in_threadpool(audit.record, session, key, "result.download", "job", job.id, {"name": name})
    return await _stream(storage, obj_key, f"{job_id[:8]}-{name}")


async def _stream(storage: Storage, obj_key: str, filename: str) -> StreamingResponse:
    """A stored object as a download, streamed in chunks; the media type follows the file name."""
    size = await run_in_threadpool(storage.size, obj_key)
    chunks = await run_in_threadpool(storage.open_stream, obj_key)
    media = next((t for suffix, t in MEDIA_TYPES.items() if filename.endswith(suffix)), "application/octet-stream")
    return StreamingResponse(chunks, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Content-Length": str(size)})


@router.get("/{job_id}/inputs/{modality}", responses={
    **PROBLEM_RESPONSES, **NOT_FOUND,
    200: {"content": {"application/gzip": {}, "application/octet-stream": {}}, "description": "the stored input"}})
async def get_input(job_id: str, modality: str, session: SessionDep, storage: StorageDep, key: KeyDep
                    ) -> StreamingResponse:
    """Download one uploaded input as stored (NIfTI, ``.nii.gz`` or ``.nii``); in validation mode also the reference."""
    job = visible_job(session, key, job_id)
    info = job.inputs.get(modality)
    if info is None:
        raise ProblemError(404, "input_not_found", f"job {job_id} has no input {modality!r} "
                           f"(inputs: {', '.join(job.inputs) or 'none'})")
    obj_key = info["key"]
    name = f"{modality}{''.join(PurePosixPath(obj_key).suffixes[-2:]) or '.nii'}"
    return await _stream(storage, obj_key, f"{job_id[:8]}-input-{name}")


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={
    **PROBLEM_RESPONSES, **NOT_FOUND, 409: {"model": Problem, "description": "the job has already ended"}})
def cancel_job(job_id: str, session: SessionDep, key: ApiKey = require(Role.integrator)) -> JobPublic:
    """Cancel: a queued job at once, a running one at its next diffusion step."""
    job = visible_job(session, key, job_id)
    job_states.request_cancel(session, job)
    audit.record(session, key, "job.cancel", "job", job.id, {"status": job.status})
    return to_public(session, job)


@router.post("/{job_id}/retry", response_model=JobPublic, status_code=202, responses={
    **PROBLEM_RESPONSES, **NOT_FOUND, 409: {"model": Problem, "description": "the job is not failed or cancelled"}})
def retry_job(job_id: str, session: SessionDep, key: ApiKey = require(Role.integrator)) -> JobPublic:
    """Run a failed or cancelled job again, with the same inputs and seed."""
    job = visible_job(session, key, job_id)
    job_states.reset_for_retry(session, job)
    publish_synthesis(job.id)
    audit.record(session, key, "job.retry", "job", job.id)
    return to_public(session, job)
