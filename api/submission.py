"""A submission, from its form fields to a queued job: validated against the serving model into a typed
:class:`Submission`, then stored, committed and published (``create_job``). FastAPI-free: ``POST /synthesize``
(``api/routes/synthesize.py``) and the DICOM listener (``worker/listener.py``) make jobs through the same two
functions, and a pull (``worker/pacs.py``) settles its targets with :func:`pulled_targets`."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import pacs
from api.core import audit, registry
from api.core.errors import ProblemError, unavailable
from api.core.models import ApiKey, Delivery, Job, new_id
from api.core.queue import publish_or_undo, publish_synthesis
from api.core.serving import ModelUnavailable, serving_modalities
from api.core.settings import get_settings
from api.core.storage import Storage, job_input_key, job_prefix
from api.dicom import DicomUpload
from api.uploads import check_same_space, hash_upload, inspect_nifti

log = logging.getLogger(__name__)
FORMATS = ("nifti", "dicom")
OPTIONS = ("targets", "formats", "steps", "seed", "samples", "series_map", "reference", "preprocess", "output_grid",
           "deliver_to", *pacs.PULL_FIELDS)
PREPROCESS = ("auto", "none", "full")  # raw clinical studies: worker/native.py, docs/imaging.md
DICOM_FIELD = "dicom"


@dataclass(frozen=True)
class Submission:
    """A validated request: what the job row will hold. ``inputs`` in the model's order (the first is the
    reference grid); ``reference``: validation mode (inputs that are also targets are withheld references)."""

    inputs: list[str]
    targets: list[str]
    formats: list[str]
    steps: int | None = None
    seed: int | None = None
    samples: int = 1
    reference: bool = False
    deliver_to: list[str] = field(default_factory=list)  # docs/pacs.md
    source: dict[str, Any] | None = None  # a pull: the worker retrieves the study (api.pacs.pull_source)
    preprocess: str = "auto"
    output_grid: str = "reference"

    def options(self) -> dict[str, Any]:
        """Everything but the inputs, as hashed for Idempotency-Key replays; defaults of options added later are
        left out, so that the request hashes of older jobs stay the same."""
        return {"targets": self.targets, "formats": self.formats, "steps": self.steps, "seed": self.seed,
                "samples": self.samples,
                **({"reference": True} if self.reference else {}),
                **({"deliver_to": self.deliver_to} if self.deliver_to else {}),
                **({"source": self.source} if self.source else {}),
                **({"preprocess": self.preprocess} if self.preprocess != "auto" else {}),
                **({"output_grid": self.output_grid} if self.output_grid != "reference" else {})}


def served_modalities(session: Session) -> tuple[str, ...]:
    """The modalities of the promoted model version (before any registration, of the configured checkpoint);
    503 ``model_unavailable`` when there is none."""
    served = registry.serving(session)
    if served is not None and served.modalities:
        return tuple(served.modalities)
    try:
        return serving_modalities()
    except ModelUnavailable as exc:
        raise unavailable("model_unavailable", str(exc)) from exc


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


def parse_request(fields: dict[str, str], *, modalities: tuple[str, ...], nifti: Collection[str] = (),
                  dicom: DicomUpload | None = None, source: dict[str, Any] | None = None) -> Submission:
    """Validate the form against the serving model: ``nifti`` the fields that carried a NIfTI file, ``dicom`` the
    inspected DICOM upload (its series count as supplied modalities), ``source`` a study the worker pulls."""
    settings = get_settings()
    unknown = sorted(set(nifti) - set(modalities))
    if unknown:
        raise ProblemError(422, "unknown_modality", f"field(s) {', '.join(unknown)} are not modalities of the serving "
                                                    f"model ({', '.join(modalities)})", fields=unknown)
    extra = sorted(set(fields) - set(OPTIONS) - set(modalities))
    if extra:
        raise ProblemError(422, "unknown_field", f"unknown form field(s): {', '.join(extra)}", fields=extra)
    given = set(nifti) | set(dicom.series if dicom else ())
    if not given and source is None:
        raise ProblemError(422, "no_inputs", f"upload at least one NIfTI volume in a field named by modality "
                                             f"({', '.join(modalities)}) or DICOM series in the field {DICOM_FIELD}")
    both_ways = sorted(set(nifti) & set(dicom.series if dicom else ()))
    if both_ways:
        raise ProblemError(422, "series_ambiguous", f"{', '.join(both_ways)} uploaded both as NIfTI and as a DICOM "
                                                    f"series")
    # a pull's default targets are known once the worker has the study (pulled_targets)
    targets = _csv(fields.get("targets")) or ([] if source else _missing(given, modalities))
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
    return Submission(
        inputs=[m for m in modalities if m in given],
        targets=sorted(dict.fromkeys(targets), key=modalities.index),
        formats=sorted(set(formats)),
        steps=_int_option(fields, "steps", 1, settings.inference.max_steps),
        seed=_int_option(fields, "seed", 0, 2**31 - 1),
        samples=_int_option(fields, "samples", 1, settings.inference.max_samples) or 1,
        reference=reference, deliver_to=deliver_to, source=source, preprocess=preprocess, output_grid=output_grid)


def _missing(given: Collection[str], modalities: Collection[str]) -> list[str]:
    return [m for m in modalities if m not in given]


def pulled_targets(named: list[str], inputs: Collection[str], modalities: Collection[str]) -> list[str]:
    """A pull's targets once the study is fetched: those named, else every modality the study lacks; 422
    ``nothing_to_synthesize`` / ``target_supplied`` as for an upload."""
    targets = list(named) or _missing(inputs, modalities)
    if not targets:
        raise ProblemError(422, "nothing_to_synthesize", "it has every modality of the model")
    supplied = [t for t in targets if t in inputs]
    if supplied:
        raise ProblemError(422, "target_supplied", f"target(s) {', '.join(supplied)} are in it")
    return targets


def _existing(session: Session, key: ApiKey, idempotency_key: str, request_hash: str) -> Job | None:
    job = session.execute(select(Job).where(Job.owner_id == key.id, Job.idempotency_key == idempotency_key)
                          ).scalar_one_or_none()
    if job is not None and job.request_hash != request_hash:
        raise ProblemError(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request")
    return job


def create_job(session: Session, storage: Storage, *, key: ApiKey, submission: Submission,
               nifti: dict[str, BinaryIO] | None = None, dicom: DicomUpload | None = None,
               idempotency_key: str | None = None) -> Job:
    """Check and store the inputs, commit the job row, then publish its task (blocking). A replay of an
    Idempotency-Key returns the first job; a publish that fails undoes the job, so that a retry starts clean."""
    nifti = nifti or {}
    names = [m for m in submission.inputs if m in nifti]
    headers = {m: inspect_nifti(m, nifti[m]) for m in names}
    check_same_space({m: (h.shape, h.affine) for m, h in headers.items()})
    hashed = {m: hash_upload(nifti[m]) for m in names}  # so a replay is answered before storing
    records = {m: s.record() for m, s in (dicom.series if dicom else {}).items()}
    hashed |= {m: (r["sha256"], r["bytes"]) for m, r in records.items()}
    request_hash = hashlib.sha256(json.dumps(
        {"inputs": {m: sha for m, (sha, _) in hashed.items()}, **submission.options()},
        sort_keys=True).encode()).hexdigest()
    if idempotency_key and (job := _existing(session, key, idempotency_key, request_hash)):
        audit.record(session, key, "job.submit", "job", job.id, {"replay": True})
        return job

    job_id = new_id()
    inputs: dict[str, Any] = {}
    try:
        inputs |= dicom.store(storage, job_id) if dicom else {}
        for m in names:
            f = nifti[m]
            f.seek(0)
            suffix = ".nii.gz" if f.read(2) == b"\x1f\x8b" else ".nii"
            f.seek(0)
            obj_key = job_input_key(job_id, f"{m}{suffix}")
            sha, size = hashed[m]
            storage.put_stream(obj_key, f, size)
            inputs[m] = {"format": "nifti", "key": obj_key, "sha256": sha, "bytes": size,
                         "shape": list(headers[m].shape)}
        inputs = {m: inputs[m] for m in submission.inputs}  # model order: the first is the reference
        job = Job(id=job_id, owner_id=key.id, idempotency_key=idempotency_key, request_hash=request_hash,
                  inputs=inputs, targets=submission.targets, formats=submission.formats, steps=submission.steps,
                  seed=submission.seed if submission.seed is not None else secrets.randbelow(2**31),
                  samples=submission.samples, source=submission.source, preprocess=submission.preprocess,
                  output_grid=submission.output_grid)
        session.add(job)
        session.flush()  # the job row before its deliveries (their foreign key)
        session.add_all(Delivery(job_id=job_id, node=node) for node in submission.deliver_to)
        session.commit()
    except IntegrityError:
        session.rollback()
        storage.delete_prefix(job_prefix(job_id))
        if idempotency_key and (job := _existing(session, key, idempotency_key, request_hash)):
            return job
        raise
    except BaseException:
        session.rollback()
        storage.delete_prefix(job_prefix(job_id))
        raise
    publish_or_undo(session, job, publish_synthesis, cleanup=lambda: storage.delete_prefix(job_prefix(job_id)))
    log.info("job %s queued: inputs=%s targets=%s", job.id, submission.inputs, submission.targets)
    audit.record(session, key, "job.submit", "job", job.id, {"inputs": submission.inputs,
                                                            "targets": submission.targets})
    return job
