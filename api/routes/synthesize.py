"""POST /api/v1/synthesize: a study in, a queued job out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import admission, pacs
from api.auth import require
from api.core.errors import ProblemError
from api.core.models import ApiKey, Role
from api.core.settings import get_settings
from api.deps import SessionDep, StorageDep
from api.dicom import DicomUpload, inspect_dicom_upload_limited
from api.schemas import PROBLEM_RESPONSES, JobAccepted, Problem
from api.submission import DICOM_FIELD, OPTIONS, PREPROCESS, create_job, parse_request, served_modalities

router = APIRouter(prefix="/api/v1", tags=["synthesis"])

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
    modalities = served_modalities(session)
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
        submission = parse_request(fields, modalities=modalities, nifti=files, dicom=dicom, source=source)
        job = await run_in_threadpool(lambda: create_job(
            session, storage, key=key, submission=submission, nifti={m: f.file for m, f in files.items()},
            dicom=dicom, idempotency_key=idempotency_key))
    finally:
        if dicom is not None:
            dicom.close()
        await form.close()
    location = f"/api/v1/jobs/{job.id}"
    response.headers["Location"] = location
    return JobAccepted(id=job.id, status=job.status)

