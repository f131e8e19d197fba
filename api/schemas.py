"""Pydantic I/O models of the public API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

JOB_EXAMPLE: dict[str, Any] = {
    "id": "3b0c1a52-8f4e-4c55-9a51-2f1d7c9e4b10",
    "status": "succeeded",
    "phase": "done",
    "progress": 100,
    "queue_position": None,
    "attempts": 1,
    "model_version": "msgldm-tiny-3f2a9c1b7d4e",
    "targets": ["flair"],
    "inputs": ["t1", "t1ce", "t2"],
    "formats": ["nifti"],
    "steps": 25,
    "seed": 1234,
    "samples": 1,
    "created_at": "2026-11-22T09:14:03.120Z",
    "started_at": "2026-11-22T09:14:04.551Z",
    "finished_at": "2026-11-22T09:14:31.906Z",
    "error": None,
    "results": {
        "flair.nii.gz": "/api/v1/jobs/3b0c1a52-8f4e-4c55-9a51-2f1d7c9e4b10/results/flair.nii.gz",
        "record.json": "/api/v1/jobs/3b0c1a52-8f4e-4c55-9a51-2f1d7c9e4b10/results/record.json",
    },
}


class JobError(BaseModel):
    code: str = Field(examples=["worker_lost"])
    message: str


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": JOB_EXAMPLE["id"], "status": "queued"}]})

    id: str
    status: str


class JobPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    phase: str = Field(description="what the job is doing: queued, starting, loading, reading, preprocess, encode, "
                                   "denoise, decode, postprocess, writing, done, failed, cancelled")
    progress: int = Field(ge=0, le=100)
    queue_position: int | None = Field(description="queued jobs ahead of this one; null unless queued")
    attempts: int
    model_version: str | None
    targets: list[str]
    inputs: list[str]
    formats: list[str]
    steps: int | None
    seed: int
    samples: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    results: dict[str, str] = Field(description="result name -> URL to download it")


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": "/problems/unknown_modality", "title": "Unknown modality", "status": 422,
        "detail": "field 'dwi' is not a modality of the serving model (t1, t2, t1ce, flair)",
        "code": "unknown_modality", "instance": "/api/v1/synthesize"}]})

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, invalid or expired API key"},
    403: {"model": Problem, "description": "the key's role may not do this"},
    429: {"model": Problem, "description": "rate limit or active-job limit of this key; retry after Retry-After"},
    503: {"model": Problem, "description": "a dependency is down; retry after Retry-After seconds"},
}


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 42, "at": "2026-11-22T09:14:03.120Z", "actor_key_id": "0b7c5d1e-6a43-4e0e-9d4b-3f2a9c1b7d4e",
        "actor_role": "integrator", "action": "job.submit", "target_type": "job",
        "target_id": JOB_EXAMPLE["id"], "detail": {"inputs": ["t1", "t1ce", "t2"], "targets": ["flair"]}}]})

    id: int
    at: datetime
    actor_key_id: str | None = Field(description="the API key that acted; null for an operator at the CLI")
    actor_role: str
    action: str = Field(description="job.submit, job.view, result.download, job.cancel, job.retry, key.create, "
                                    "key.revoke, ...")
    target_type: str
    target_id: str | None
    detail: dict[str, Any] | None


class AuditList(BaseModel):
    items: list[AuditEventPublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page; null on the last")
