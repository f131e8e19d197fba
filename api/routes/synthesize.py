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
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import admission, pacs
from api.auth import require
from api.core import audit, registry
from api.core.models import ApiKey, Delivery, Job, Role, new_id
from api.core.queue import publish_synthesis
from api.core.serving import ModelUnavailable, serving_modalities
from api.core.settings import get_settings
from api.core.storage import Storage
from api.deps import SessionDep, StorageDep
from api.dicom import DicomUpload, inspect_dicom_upload_limited
from api.errors import ProblemError, unavailable
from api.pacs import PULL_FIELDS
from api.schemas import PROBLEM_RESPONSES, JobAccepted, Problem
from api.uploads import check_same_space, hash_upload, inspect_nifti

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["synthesis"])
FORMATS = ("nifti", "dicom")
OPTIONS = ("targets", "formats", "steps", "seed", "samples", "series_map", "reference", "preprocess", "output_grid",
           "deliver_to", *PULL_FIELDS)
PREPROCESS = ("auto", "none", "full")  # raw clinical studies: worker/native.py, docs/imaging.md
DICOM_FIELD = "dicom"

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
                "dicom": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "DICOM: one or more zips and/or .dcm files (repeat the field); series are "
                                         "mapped to modalities by series_map or the rules (docs/imaging.md)"},
                "series_map": {"type": "string", "example": "3=t1,5=flair",
                               "description": "SeriesNumber or SeriesInstanceUID = modality, comma-separated "
                                              "(or a JSON object); without it the SeriesDescription rules decide"},
                "targets": {"type": "string", "example": "flair",
                            "description": "comma-separated modalities to synthesize; default: every modality "
                                           "of the model that was not supplied"},
                "formats": {"type": "string", "example": "nifti,dicom",
                            "description": "comma-separated: nifti (default), dicom ({modality}.dicom.zip)"},
                "steps": {"type": "integer", "minimum": 1, "description": "DDIM steps (default: the model's)"},
                "seed": {"type": "integer", "minimum": 0, "description": "random seed (default: drawn)"},
                "samples": {"type": "integer", "minimum": 1, "description": "samples for an uncertainty map"},
                "reference": {"type": "boolean", "description": "validation mode: the named targets are also "
                              "uploaded; the worker withholds them from the model and scores against them"},
                "deliver_to": {"type": "string", "example": "orthanc",
                               "description": "comma-separated DICOM node names (MSGLDM_DICOM__NODES): after "
                                              "success the DICOM result is sent there and verified (docs/pacs.md)"},
                "source_node": {"type": "string", "example": "orthanc",
                                "description": "instead of files: the node the worker retrieves study_uid from"},
                "study_uid": {"type": "string", "example": "1.2.826.0.1.3680043.8.498.1",
                              "description": "StudyInstanceUID to retrieve from source_node"},
                "series_uids": {"type": "string", "description": "optional: comma-separated SeriesInstanceUIDs of "
                                                                 "the study to use (default: every series)"},
                "preprocess": {"type": "string", "enum": list(PREPROCESS), "default": "auto", "example": "auto",
                               "description": "raw studies (skull on, each series on its own grid): full = brain "
                                              "extraction, registration, atlas space and back; none = the inputs "
                                              "are BraTS-like; auto (default) decides from the inputs"},
                "output_grid": {"type": "string", "default": "reference", "example": "flair",
                                "description": "with preprocessing: the grid results are written on: reference "
                                               "(the 3D T1, else T1CE, else the finest series), a supplied "
                                               "modality's name (its series' grid), or atlas (SRI24 240x240x155)"},
            },
        },
        "encoding": {**{m: {"contentType": "application/gzip, application/octet-stream"}
                        for m in ("t1", "t2", "t1ce", "flair")},
                     "dicom": {"contentType": "application/zip, application/dicom, application/octet-stream"}},
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


def parse_request(files: dict[str, UploadFile], fields: dict[str, str], modalities: tuple[str, ...],
                  dicom: DicomUpload | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate the form against the serving model (``dicom``: the inspected DICOM upload, whose series count as
    supplied modalities; ``source``: a study the worker pulls, api.pacs); returns the normalised request."""
    settings = get_settings()
    unknown = sorted(set(files) - set(modalities))
    if unknown:
        raise ProblemError(422, "unknown_modality", f"field(s) {', '.join(unknown)} are not modalities of the serving "
                                                    f"model ({', '.join(modalities)})", fields=unknown)
    extra = sorted(set(fields) - set(OPTIONS) - set(modalities))
    if extra:
        raise ProblemError(422, "unknown_field", f"unknown form field(s): {', '.join(extra)}", fields=extra)
    given = set(files) | set(dicom.series if dicom else ())
    if not given and source is None:
        raise ProblemError(422, "no_inputs", f"upload at least one NIfTI volume in a field named by modality "
                                             f"({', '.join(modalities)}) or DICOM series in the field {DICOM_FIELD}")
    both_ways = sorted(set(files) & set(dicom.series if dicom else ()))
    if both_ways:
        raise ProblemError(422, "series_ambiguous", f"{', '.join(both_ways)} uploaded both as NIfTI and as a DICOM "
                                                    f"series")
    supplied = [m for m in modalities if m in given]
    # a pull's default targets are known once the worker has the study: every modality it lacks
    targets = _csv(fields.get("targets")) or ([] if source else [m for m in modalities if m not in given])
    bad = [t for t in targets if t not in modalities]
    if bad:
        raise ProblemError(422, "unknown_target", f"target(s) {', '.join(bad)} are not modalities of the serving "
                                                  f"model ({', '.join(modalities)})")
    both = [t for t in targets if t in given]
    reference = fields.get("reference", "").strip().lower() in ("true", "1", "yes")
    if both and not reference:
        raise ProblemError(422, "target_supplied", f"target(s) {', '.join(both)} were also uploaded as inputs "
                                                   "(send reference=true to score the synthesis against them)")
    if reference and (not _csv(fields.get("targets")) or len(both) < len(targets)):
        raise ProblemError(422, "reference_missing", "reference=true needs targets, each also uploaded")
    if both and set(both) == set(given):
        raise ProblemError(422, "no_inputs", "every upload is a reference: upload an input to synthesize from")
    if not targets and source is None:
        raise ProblemError(422, "nothing_to_synthesize", "every modality of the model was supplied")
    deliver_to = pacs.deliver_to(fields, settings.dicom)
    formats = (_csv(fields.get("formats")) or ["nifti"]) + (["dicom"] if deliver_to else [])
    unsupported = [f for f in formats if f not in FORMATS]
    if unsupported:
        raise ProblemError(422, "unsupported_format", f"format(s) {', '.join(unsupported)} are not supported "
                                                      f"(supported: {', '.join(FORMATS)})")
    preprocess = (fields.get("preprocess") or "auto").strip().lower()
    if preprocess not in PREPROCESS:
        raise ProblemError(422, "invalid_option", f"preprocess must be one of {', '.join(PREPROCESS)}, got "
                                                  f"{preprocess!r}", field="preprocess")
    output_grid = (fields.get("output_grid") or "reference").strip().lower()
    if output_grid not in ("reference", "atlas", *given):
        raise ProblemError(422, "invalid_option", f"output_grid must be reference, atlas or a supplied modality "
                                                  f"({', '.join(m for m in modalities if m in given)}), got "
                                                  f"{output_grid!r}", field="output_grid")
    return {
        "inputs": supplied,
        "targets": sorted(dict.fromkeys(targets), key=modalities.index),
        "formats": sorted(set(formats)),
        "steps": _int_option(fields, "steps", 1, settings.inference.max_steps),
        "seed": _int_option(fields, "seed", 0, 2**31 - 1),
        "samples": _int_option(fields, "samples", 1, settings.inference.max_samples) or 1,
        **({"reference": True} if reference else {}),  # validation mode: inputs ∩ targets are withheld references
        **({"deliver_to": deliver_to} if deliver_to else {}),  # docs/pacs.md
        **({"source": source} if source else {}),
        **({"preprocess": preprocess} if preprocess != "auto" else {}),  # defaults left out: request hashes of
        **({"output_grid": output_grid} if output_grid != "reference" else {}),  # older jobs stay the same
    }


def _existing(session: Session, key: ApiKey, idempotency_key: str, request_hash: str) -> Job | None:
    job = session.execute(select(Job).where(Job.owner_id == key.id, Job.idempotency_key == idempotency_key)
                          ).scalar_one_or_none()
    if job is not None and job.request_hash != request_hash:
        raise ProblemError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request")
    return job


def create_job(session: Session, storage: Storage, key: ApiKey, files: dict[str, UploadFile],
               req: dict[str, Any], idempotency_key: str | None, dicom: DicomUpload | None = None) -> Job:
    """Check and store the inputs, commit the job row, then publish its task (blocking; runs in a thread)."""
    nifti = [m for m in req["inputs"] if m in files]
    headers = {m: inspect_nifti(m, files[m].file) for m in nifti}
    check_same_space({m: (h.shape, h.affine) for m, h in headers.items()})
    hashed = {m: hash_upload(files[m].file) for m in nifti}  # so a replay is answered before storing
    hashed |= {m: (s.record()["sha256"], s.record()["bytes"]) for m, s in (dicom.series if dicom else {}).items()}
    request_hash = hashlib.sha256(json.dumps(
        {"inputs": {m: sha for m, (sha, _) in hashed.items()}, **{k: v for k, v in req.items() if k != "inputs"}},
        sort_keys=True).encode()).hexdigest()
    if idempotency_key and (job := _existing(session, key, idempotency_key, request_hash)):
        audit.record(session, key, "job.submit", "job", job.id, {"replay": True})
        return job

    job_id = new_id()
    inputs: dict[str, Any] = {}
    try:
        inputs |= dicom.store(storage, job_id) if dicom else {}
        for m in nifti:
            f = files[m].file
            f.seek(0)
            suffix = ".nii.gz" if f.read(2) == b"\x1f\x8b" else ".nii"
            f.seek(0)
            obj_key = f"jobs/{job_id}/inputs/{m}{suffix}"
            sha, size = hashed[m]
            storage.put_stream(obj_key, f, size)
            inputs[m] = {"format": "nifti", "key": obj_key, "sha256": sha, "bytes": size,
                         "shape": list(headers[m].shape)}
        inputs = {m: inputs[m] for m in req["inputs"]}  # model order: the first is the reference
        job = Job(id=job_id, owner_id=key.id, idempotency_key=idempotency_key, request_hash=request_hash,
                  inputs=inputs, targets=req["targets"], formats=req["formats"], steps=req["steps"],
                  seed=req["seed"] if req["seed"] is not None else secrets.randbelow(2**31), samples=req["samples"],
                  source=req.get("source"), preprocess=req.get("preprocess", "auto"),
                  output_grid=req.get("output_grid", "reference"))
        session.add(job)
        session.flush()  # the job row before its deliveries (their foreign key)
        session.add_all(Delivery(job_id=job_id, node=node) for node in req.get("deliver_to", ()))
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
    audit.record(session, key, "job.submit", "job", job.id, {"inputs": req["inputs"], "targets": req["targets"]})
    return job


@router.post(
    "/synthesize", status_code=202, response_model=JobAccepted, openapi_extra={"requestBody": REQUEST_BODY},
    responses={**PROBLEM_RESPONSES, 400: {"model": Problem, "description": "the multipart body is malformed or has "
                                                                        "too many parts"},
               413: {"model": Problem, "description": "upload too large"},
               422: {"model": Problem, "description": "invalid study or options; `code` says which"}},
)
async def synthesize(request: Request, response: Response, session: SessionDep, storage: StorageDep,
                     key: ApiKey = require(Role.integrator),
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobAccepted:
    """Submit a study: one NIfTI per available modality and/or DICOM series; answers 202 with the job's Location."""
    served = registry.serving(session)  # the promoted version; before any registration, the configured checkpoint
    try:
        modalities = tuple(served.modalities) if served is not None and served.modalities else serving_modalities()
    except ModelUnavailable as exc:
        raise unavailable("model_unavailable", str(exc)) from exc
    await run_in_threadpool(admission.admit_submission, session, key)
    settings = get_settings()
    try:
        form = await request.form(max_files=settings.dicom.max_files + len(modalities), max_fields=len(OPTIONS) + 1)
    except StarletteHTTPException as exc:  # a malformed body, too many parts: Starlette's 400, with our code
        raise ProblemError(400, "invalid_multipart", str(exc.detail)) from None
    dicom: DicomUpload | None = None
    try:
        files: dict[str, UploadFile] = {}
        dicom_files: list[UploadFile] = []
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            name = name.lower()
            if name == DICOM_FIELD and isinstance(value, UploadFile):
                dicom_files.append(value)
                continue
            if name in files or name in fields:
                raise ProblemError(422, "duplicate_field", f"field {name!r} appears more than once")
            if isinstance(value, UploadFile):
                files[name] = value
            else:
                fields[name] = value
        if "series_map" in fields and not dicom_files:
            raise ProblemError(422, "invalid_series_map", "series_map given without DICOM files", field="series_map")
        if dicom_files:
            uploads = [(f.filename or f"{DICOM_FIELD}[{i}]", f.file) for i, f in enumerate(dicom_files)]
            dicom = await run_in_threadpool(inspect_dicom_upload_limited, uploads, modalities=modalities,
                                            series_map=fields.get("series_map"), cfg=settings.dicom,
                                            max_voxels=settings.api.max_volume_voxels, limits=settings.api)
        source = pacs.pull_source(fields, bool(files or dicom_files), settings.dicom)
        req = parse_request(files, fields, modalities, dicom, source)
        job = await run_in_threadpool(create_job, session, storage, key, files, req, idempotency_key, dicom)
    finally:
        if dicom is not None:
            dicom.close()
        await form.close()
    location = f"/api/v1/jobs/{job.id}"
    response.headers["Location"] = location
    return JobAccepted(id=job.id, status=job.status)

