"""Pydantic I/O models of the public API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.core.results import Kind

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
    "formats": ["dicom", "nifti"],
    "steps": 25,
    "seed": 1234,
    "samples": 1,
    "preprocess": "auto",
    "output_grid": "reference",
    "created_at": "2026-11-22T09:14:03.120Z",
    "started_at": "2026-11-22T09:14:04.551Z",
    "finished_at": "2026-11-22T09:14:31.906Z",
    "error": None,
    "results": {
        "flair.nii.gz": "/api/v1/jobs/3b0c1a52-8f4e-4c55-9a51-2f1d7c9e4b10/results/flair.nii.gz",
        "flair.dicom.zip": "/api/v1/jobs/3b0c1a52-8f4e-4c55-9a51-2f1d7c9e4b10/results/flair.dicom.zip",
        "record.json": "/api/v1/jobs/3b0c1a52-8f4e-4c55-9a51-2f1d7c9e4b10/results/record.json",
    },
    "result_kinds": {"flair.nii.gz": {"kind": "synthesized", "modality": "flair", "overlay": None},
                     "flair.dicom.zip": {"kind": "dicom", "modality": "flair", "overlay": None},
                     "record.json": {"kind": "record", "modality": None, "overlay": None}},
    "source": None,
    "deliveries": [{"node": "orthanc", "status": "delivered", "attempts": 1, "error": None, "instances": 35,
                    "verified_at": "2026-11-22T09:14:33.210Z"}],
}


class ResultKindPublic(BaseModel):
    kind: Kind = Field(description="synthesized volume, its uncertainty (SD), the normalised reference "
                                                "(validation mode), a decoded DICOM input, the DICOM series (zip), a "
                                                "raw study's viewer overlay, preview.png, report.html, record.json")
    modality: str | None = Field(None, description="the modality it belongs to (None: the job's own files)")
    overlay: str | None = Field(None, description="kind overlay: brain_mask.outline or registration.edges")


class JobError(BaseModel):
    code: str = Field(examples=["worker_lost"])
    message: str


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": JOB_EXAMPLE["id"], "status": "queued"}]})

    id: str
    status: str


class DeliveryPublic(BaseModel):
    """The job's DICOM result sent to one node (``deliver_to``, docs/pacs.md)."""

    node: str
    status: str = Field(description="pending (waiting for the job or the next attempt), delivered (sent and "
                                     "verified: the node lists every SOP instance) or failed")
    attempts: int
    error: str | None = Field(description="the last attempt's failure, with the node's reason (STOW-RS "
                                          "FailedSOPSequence, C-STORE status)")
    instances: int | None = Field(description="SOP instances sent and found on the node")
    verified_at: datetime | None


class JobPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    phase: str = Field(description="what the job is doing: queued, starting, loading, reading, preprocess "
                                   "(raw studies also brain_extraction, registration), encode, denoise, decode, "
                                   "postprocess, writing, done, failed, cancelled")
    progress: int = Field(ge=0, le=100)
    queue_position: int | None = Field(description="queued jobs ahead of this one; null unless queued")
    attempts: int
    model_version: str | None
    targets: list[str]
    inputs: list[str] = Field(description="supplied modalities in model order (the first is the reference grid); "
                                          "NIfTI files or DICOM series")
    formats: list[str] = Field(description="nifti (always written) and/or dicom ({modality}.dicom.zip)")
    steps: int | None
    seed: int
    samples: int
    preprocess: str = Field("auto", description="auto, none or full: the raw-study chain (docs/imaging.md); the "
                                                "mode that ran is in record.json")
    output_grid: str = Field("reference", description="the grid results lie on: reference, a modality, or atlas")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    results: dict[str, str] = Field(description="result name -> URL to download it")
    result_kinds: dict[str, ResultKindPublic] = Field(default_factory=dict,
                                                     description="result name -> what it is (api/core/results.py)")
    source: dict[str, Any] | None = Field(None, description="a pull job: the node, study_uid, series_uids asked "
                                          "for and, once retrieved, what was fetched")
    deliveries: list[DeliveryPublic] = Field(default_factory=list, description="deliver_to: one entry per node")


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


# ----------------------------------------------------------------------------------------------- training, models

class DatasetSpec(BaseModel):
    """Where the training data is: a folder on the worker host (the API host must see it too, to validate it) or
    an object-storage prefix; ``layout`` brats (2020/2021/2023 and BraTS-Toolkit names), wmh or ixi."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"path": "/datasets/brats2023", "layout": "brats"}, {"prefix": "datasets/site-a/", "layout": "wmh"}]})

    path: str | None = None
    prefix: str | None = None
    layout: str = "brats"

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("give exactly one of path and prefix")
        return self


class DatasetReport(BaseModel):
    valid: bool
    cases: int
    modalities: dict[str, int] = Field(description="modality -> number of cases that have it")
    labels: dict[str, Any] = Field(description="label convention per layout found: region -> label values")
    layouts: dict[str, int] = Field(default_factory=dict)
    problems: list[str]
    case_details: list[dict[str, Any]] = Field(default_factory=list, description="per case (at most 200)")


class TrainingRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"preset": "brats", "dataset": {"path": "/datasets/brats2023", "layout": "brats"}, "stages": [0, 1, 2],
         "max_steps": [20000, 10000, 30000], "batch_size": 8, "gpus": None, "base_version": None}]})

    preset: str = Field("brats", pattern=r"^[A-Za-z0-9_-]{1,100}$", description="brats, wmh, ixi or tiny")
    dataset: DatasetSpec
    stages: list[int] = Field(default_factory=lambda: [0, 1, 2],
                              description="0 autoencoder, 1 structure model, 2 diffusion; must include 2; stages "
                                          "left out come from base_version")
    epochs: float | None = Field(None, gt=0, description="epochs per stage (instead of max_steps)")
    max_steps: int | list[int] | None = Field(None, description="steps per stage: N, or [N0, N1, N2]")
    batch_size: int | None = Field(None, ge=1, le=4096)
    gpus: int | None = Field(None, ge=1, description="GPUs to use through DDP; default every GPU of the host")
    base_version: str | None = Field(None, description="fine-tune from this model version")

    @model_validator(mode="after")
    def _check(self) -> TrainingRunCreate:
        if not self.stages or sorted(set(self.stages)) != sorted(self.stages) or not set(self.stages) <= {0, 1, 2}:
            raise ValueError("stages is a non-empty list of distinct stages among 0, 1, 2")
        self.stages = sorted(self.stages)  # trained in order: each stage builds on the earlier ones
        if 2 not in self.stages:
            raise ValueError("stages must include 2 (a run produces a model version)")
        if set(self.stages) != {0, 1, 2} and self.base_version is None:
            raise ValueError("stages left out of the run come from base_version: give one, or train all stages")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        steps = [self.max_steps] if isinstance(self.max_steps, int) else self.max_steps
        if steps is not None and (len(steps) not in (1, 3) or any(s < 1 for s in steps)):
            raise ValueError("max_steps is a positive N or [N0, N1, N2]")
        return self


class HistoryEntry(BaseModel):
    stage: int
    epoch: float | None
    step: int
    losses: dict[str, float]
    val: dict[str, float]


class GateResult(BaseModel):
    """A check between training stages (docs/model.md "Gates"), computed by the trainer on the validation split."""

    stage: int
    name: str
    value: float
    threshold: float
    passed: bool
    detail: dict[str, Any] = {}


class TrainingRunPublic(BaseModel):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    stage: int | str | None = Field(description="0, 1, 2, 'evaluate' or null")
    progress: int = Field(ge=0, le=100)
    preset: str
    dataset: dict[str, Any]
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    history: list[HistoryEntry]
    gates: dict[str, GateResult] = Field(default_factory=dict, description="by stage ('stage0', ...): the trainer's "
                                          "gates; a failed gate stops the run with error_code training_error")
    log_tail: str
    checkpoint: dict[str, Any] | None = Field(description="the last checkpoint in object storage: {stage, step}")
    model_version: str | None
    error_code: str | None
    error_message: str | None
    attempts: int


class TrainingRunList(BaseModel):
    items: list[TrainingRunPublic]
    next_cursor: str | None


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    version: str
    status: str = Field(description="candidate, serving or retired")
    preset: str | None
    created_at: datetime
    promoted_at: datetime | None
    training_run_id: str | None
    base_version: str | None
    previous_version: str | None = Field(description="the version a rollback of this one serves again")
    forced: bool = Field(description="promoted with force although it did not beat the baselines")
    metrics: dict[str, Any]


class ModelList(BaseModel):
    serving: str | None
    items: list[ModelVersionPublic]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="serve it even though it does not beat the baselines (audited)")
    reason: str | None = Field(None, max_length=2000)


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
