"""POST /api/v1/synthesize: a study in, a queued job out."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from api.auth import require
from api.core.models import ApiKey, Job, Role, new_id
from api.core.queue import publish_synthesis
from api.core.serving import ModelUnavailable, serving_modalities
from api.core.settings import get_settings
from api.core.storage import Storage
from api.deps import SessionDep, StorageDep
from api.errors import ProblemError, unavailable
from api.schemas import PROBLEM_RESPONSES, JobAccepted, Problem
from api.uploads import hash_upload, inspect_nifti_header

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["synthesis"])
FORMATS = ("nifti",)
OPTIONS = ("targets", "formats", "steps", "seed", "samples", "reference")

REQUEST_BODY = {
    "required": True,
    "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {
                "t1": {"type": "string", "format": "binary", "description": "T1 NIfTI (.nii or .nii.gz)"},
                "t2": {"type": "string", "format": "binary", "description": "T2 NIfTI"},
                "t1ce": {"type": "string", "format": "binary", "description": "contrast-enhanced T1 NIfTI"},
                "flair": {"type": "string", "format": "binary", "description": "FLAIR NIfTI"},
                "targets": {"type": "string", "example": "flair",
                            "description": "comma-separated modalities to synthesize; default: every modality "
                                           "of the model that was not supplied"},
                "formats": {"type": "string", "example": "nifti", "description": "comma-separated: nifti"},
                "steps": {"type": "integer", "minimum": 1, "description": "DDIM steps (default: the model's)"},
                "seed": {"type": "integer", "minimum": 0, "description": "random seed (default: drawn)"},
                "samples": {"type": "integer", "minimum": 1, "description": "samples for an uncertainty map"},
                "reference": {"type": "boolean", "description": "validation mode: the named targets are also "
                              "uploaded; the worker withholds them from the model and scores against them"},
            },
        },
        "encoding": {m: {"contentType": "application/gzip, application/octet-stream"}
                     for m in ("t1", "t2", "t1ce", "flair")},
    }},
}


def _int_option(form: dict[str, str], name: str, low: int, high: int) -> int | None:
    raw = form.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise ProblemError(422, "invalid_option", f"{name} must be an integer, got {raw!r}", field=name) from exc
    if not low <= value <= high:
        raise ProblemError(422, "invalid_option", f"{name} must be between {low} and {high}, got {value}", field=name)
    return value


def _csv(raw: str | None) -> list[str]:
    return [p.strip().lower() for p in (raw or "").split(",") if p.strip()]


def parse_request(files: dict[str, UploadFile], fields: dict[str, str], modalities: tuple[str, ...]) -> dict[str, Any]:
    """Validate the form against the serving model; returns the normalised request."""
    settings = get_settings()
    unknown = sorted(set(files) - set(modalities))
    if unknown:
        raise ProblemError(422, "unknown_modality", f"field(s) {', '.join(unknown)} are not modalities of the serving "
                                                    f"model ({', '.join(modalities)})", fields=unknown)
    extra = sorted(set(fields) - set(OPTIONS) - set(modalities))
    if extra:
        raise ProblemError(422, "unknown_field", f"unknown form field(s): {', '.join(extra)}", fields=extra)
    if not files:
        raise ProblemError(422, "no_inputs", f"upload at least one NIfTI volume in a field named by modality "
                                             f"({', '.join(modalities)})")
    supplied = [m for m in modalities if m in files]
    targets = _csv(fields.get("targets")) or [m for m in modalities if m not in files]
    bad = [t for t in targets if t not in modalities]
    if bad:
        raise ProblemError(422, "unknown_target", f"target(s) {', '.join(bad)} are not modalities of the serving "
                                                  f"model ({', '.join(modalities)})")
    both = [t for t in targets if t in files]
    reference = fields.get("reference", "").strip().lower() in ("true", "1", "yes")
    if both and not reference:
        raise ProblemError(422, "target_supplied", f"target(s) {', '.join(both)} were also uploaded as inputs "
                                                   "(send reference=true to score the synthesis against them)")
    if reference and (not _csv(fields.get("targets")) or len(both) < len(targets)):
        raise ProblemError(422, "reference_missing", "reference=true needs targets, each also uploaded")
    if both and set(both) == set(files):
        raise ProblemError(422, "no_inputs", "every upload is a reference: upload an input to synthesize from")
    if not targets:
        raise ProblemError(422, "nothing_to_synthesize", "every modality of the model was supplied")
    formats = _csv(fields.get("formats")) or ["nifti"]
    unsupported = [f for f in formats if f not in FORMATS]
    if unsupported:
        raise ProblemError(422, "unsupported_format", f"format(s) {', '.join(unsupported)} are not supported "
                                                      f"(supported: {', '.join(FORMATS)})")
    return {
        "inputs": supplied,
        "targets": sorted(dict.fromkeys(targets), key=modalities.index),
        "formats": sorted(set(formats)),
        "steps": _int_option(fields, "steps", 1, settings.inference.max_steps),
        "seed": _int_option(fields, "seed", 0, 2**31 - 1),
        "samples": _int_option(fields, "samples", 1, settings.inference.max_samples) or 1,
        **({"reference": True} if reference else {}),  # validation mode: inputs ∩ targets are withheld references
    }


def _existing(session: Session, key: ApiKey, idempotency_key: str, request_hash: str) -> Job | None:
    job = session.execute(select(Job).where(Job.owner_id == key.id, Job.idempotency_key == idempotency_key)
                          ).scalar_one_or_none()
    if job is not None and job.request_hash != request_hash:
        raise ProblemError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request")
    return job


def create_job(session: Session, storage: Storage, key: ApiKey, files: dict[str, UploadFile],
               req: dict[str, Any], idempotency_key: str | None) -> Job:
    """Check and store the inputs, commit the job row, then publish its task (blocking; runs in a thread)."""
    max_voxels = get_settings().api.max_volume_voxels
    shapes = {m: inspect_nifti_header(m, files[m].file, max_voxels=max_voxels) for m in req["inputs"]}
    if len(set(shapes.values())) > 1:
        raise ProblemError(422, "grid_mismatch", "the inputs are not on one grid: "
                           + ", ".join(f"{m} {s}" for m, s in shapes.items()))
    hashed = {m: hash_upload(files[m].file) for m in req["inputs"]}  # so a replay is answered before storing
    request_hash = hashlib.sha256(json.dumps(
        {"inputs": {m: sha for m, (sha, _) in hashed.items()}, **{k: v for k, v in req.items() if k != "inputs"}},
        sort_keys=True).encode()).hexdigest()
    if idempotency_key and (job := _existing(session, key, idempotency_key, request_hash)):
        return job

    job_id = new_id()
    inputs: dict[str, Any] = {}
    try:
        for m in req["inputs"]:
            f = files[m].file
            f.seek(0)
            suffix = ".nii.gz" if f.read(2) == b"\x1f\x8b" else ".nii"
            f.seek(0)
            obj_key = f"jobs/{job_id}/inputs/{m}{suffix}"
            sha, size = hashed[m]
            storage.put_stream(obj_key, f, size)
            inputs[m] = {"key": obj_key, "sha256": sha, "bytes": size, "shape": list(shapes[m])}
        job = Job(id=job_id, owner_id=key.id, idempotency_key=idempotency_key, request_hash=request_hash,
                  inputs=inputs, targets=req["targets"], formats=req["formats"], steps=req["steps"],
                  seed=req["seed"] if req["seed"] is not None else secrets.randbelow(2**31), samples=req["samples"])
        session.add(job)
        session.commit()
    except IntegrityError:
        session.rollback()
        storage.delete_prefix(f"jobs/{job_id}/")
        if idempotency_key and (job := _existing(session, key, idempotency_key, request_hash)):
            return job
        raise
    except BaseException:
        session.rollback()
        storage.delete_prefix(f"jobs/{job_id}/")
        raise
    try:
        publish_synthesis(job.id)
    except Exception:
        # Not published: undo the job entirely so the client's retry (same Idempotency-Key) starts clean.
        session.delete(job)
        session.commit()
        storage.delete_prefix(f"jobs/{job_id}/")
        raise
    log.info("job %s queued: inputs=%s targets=%s", job.id, req["inputs"], req["targets"])
    return job


@router.post(
    "/synthesize", status_code=202, response_model=JobAccepted, openapi_extra={"requestBody": REQUEST_BODY},
    responses={**PROBLEM_RESPONSES, 413: {"model": Problem, "description": "upload too large"},
               422: {"model": Problem, "description": "invalid study or options; `code` says which"}},
)
async def synthesize(request: Request, response: Response, session: SessionDep, storage: StorageDep,
                     key: ApiKey = require(Role.integrator),
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobAccepted:
    """Submit a study: one NIfTI per available modality; answers 202 with the job's Location."""
    try:
        modalities = serving_modalities()
    except ModelUnavailable as exc:
        raise unavailable("model_unavailable", str(exc)) from exc
    form = await request.form(max_files=len(modalities) + 1, max_fields=len(OPTIONS) + 1)
    try:
        files: dict[str, UploadFile] = {}
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            name = name.lower()
            if name in files or name in fields:
                raise ProblemError(422, "duplicate_field", f"field {name!r} appears more than once")
            if isinstance(value, UploadFile):
                files[name] = value
            else:
                fields[name] = value
        req = parse_request(files, fields, modalities)
        job = await run_in_threadpool(create_job, session, storage, key, files, req, idempotency_key)
    finally:
        await form.close()
    location = f"/api/v1/jobs/{job.id}"
    response.headers["Location"] = location
    return JobAccepted(id=job.id, status=job.status)

