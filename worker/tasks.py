"""The synthesis task: claim -> read inputs -> run the model -> write results -> complete. Safe to run twice."""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from api.core import jobs
from api.core import results as result_names
from api.core.db import session_scope
from api.core.models import Job
from api.core.queue import SYNTHESIZE_TASK, publish_synthesis
from api.core.settings import get_settings
from api.core.storage import StorageError, attempt_prefix, get_storage
from model import errors as model_errors
from worker import files, native, pacs, runtime
from worker.app import app
from worker.report import write_report

log = logging.getLogger(__name__)
ERROR_CODES: dict[type, str] = {  # model errors -> stable job failure codes (docs/errors.md)
    model_errors.StudyGeometryError: "grid_mismatch",
    model_errors.UnknownModalityError: "unknown_modality",
    model_errors.NoInputError: "no_inputs",
    model_errors.TargetError: "invalid_target",
    model_errors.EmptyBrainError: "empty_brain",
    model_errors.CheckpointError: "model_unavailable",
    model_errors.BrainExtractionError: "brain_extraction_failed",  # raw studies (model/native.py), naming the series
    model_errors.RegistrationError: "registration_failed",
}


class JobStopped(Exception):
    """Cancellation was requested, or this worker lost its claim; raised between diffusion steps."""


class Lease:
    """Renews the claim's lease from a thread and carries progress to the database; flags stop requests."""

    def __init__(self, claim: jobs.Claim, lease_seconds: int) -> None:
        self.claim, self.lease_seconds = claim, lease_seconds
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.id[:8]}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def update(self, **values: Any) -> None:
        """Record phase/progress/model_version; written at the next renewal (at most every second)."""
        with self._lock:
            self._pending.update(values)
        if self.stopped.is_set():
            raise JobStopped(self.claim.id)

    def _flush(self) -> None:
        with self._lock:
            values, self._pending = self._pending, {}
        with session_scope() as session:
            if not jobs.renew(session, self.claim, lease_seconds=self.lease_seconds, **values):
                self.stopped.set()

    def _run(self) -> None:
        last_renew = 0.0
        while not self._done.wait(0.5):
            now = time.monotonic()
            if self._pending or now - last_renew > self.lease_seconds / 4:
                try:
                    self._flush()
                    last_renew = now
                except Exception:  # noqa: BLE001 - the database may be restarting; the lease has slack
                    log.warning("lease renewal of %s failed", self.claim.id, exc_info=True)


def _write_results(job: Job, claim: jobs.Claim, result: native.JobResult, record: dict[str, Any], workdir: Path,
                   study: dict[str, Any], synth: Any) -> dict[str, str]:
    """Every result file (outputs, inputs as NIfTI, the report and record.json) under the attempt's prefix;
    returns ``{result name: storage key}``."""
    paths = files.write_result_files(job, result, study, workdir)
    paths |= write_report(job, result, record, study, workdir,  # validation metrics, preview.png, report.html
                          preprocess_cfg=synth.config.preprocess, modalities=synth.modalities)
    paths[result_names.RECORD] = workdir / result_names.RECORD
    paths[result_names.RECORD].write_text(json.dumps(record, indent=2, default=str))
    prefix = attempt_prefix(job.id, claim.attempt)
    storage = get_storage()
    for name, path in paths.items():
        storage.put_file(prefix + name, path)
    return {name: prefix + name for name in paths}


def run_job(job_id: str) -> str:
    """Run one job to an end state; returns what happened (for logs and tests)."""
    settings = get_settings()
    with session_scope() as session:
        claim = jobs.claim(session, job_id, worker_id=runtime.worker_id(), lease_seconds=settings.jobs.lease_seconds,
                           max_attempts=settings.jobs.max_attempts)
        job = session.get(Job, job_id) if claim else None
    if claim is None or job is None:
        log.info("job %s: not claimable (finished, cancelled or held elsewhere); nothing to do", job_id)
        return "skipped"

    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with Lease(claim, settings.jobs.lease_seconds) as lease, tempfile.TemporaryDirectory(prefix="msgldm-") as tmp:
            workdir = Path(tmp)
            lease.update(phase="loading", progress=0)
            synth = runtime.get_synthesizer()
            lease.update(model_version=synth.version, phase="reading")
            t0 = time.perf_counter()
            if job.source and not job.inputs:  # a pull job's first attempt: retrieve the study (worker/pacs.py)
                job = pacs.fetch_study(job, claim.token, synth.modalities, workdir)
            study = files.read_inputs(job, workdir)
            timings["read"] = time.perf_counter() - t0

            def progress(phase: str, fraction: float) -> None:
                lease.update(phase=phase, progress=int(5 + 90 * fraction))

            steps = job.steps or settings.inference.default_steps or synth.default_steps
            # validation references are withheld from the model; preprocess/output_grid: worker/native.py
            result, preprocessing = native.run(synth, study, job.targets, preprocess=job.preprocess or "auto",
                                               output_grid=job.output_grid or "reference", steps=steps,
                                               seed=job.seed, samples=job.samples, progress=progress)
            timings |= {k: float(v) for k, v in result.timings.items()}
            lease.update(phase="writing", progress=96)
            t0 = time.perf_counter()
            record = {
                "job_id": job.id, "attempt": claim.attempt, "model_version": synth.version,
                "device": runtime.device_name(), "seed": job.seed, "steps": steps,
                "samples": job.samples, "targets": job.targets,
                "inputs": files.input_record(job, study),
                "timings_seconds": timings,
                "synthesis": result.meta,  # reference modality, slices, eta, warnings
                "preprocessing": preprocessing,  # mode, transforms, brain mask, interpolators, versions
            }
            results = _write_results(job, claim, result, record, workdir, study, synth)
            timings["write"] = time.perf_counter() - t0
        with session_scope() as session:
            succeeded = jobs.complete(session, claim, results=results, model_version=synth.version)
        if succeeded:
            for attempt in range(1, claim.attempt):  # partial results of attempts that died mid-write
                get_storage().delete_prefix(attempt_prefix(job_id, attempt))
            log.info("job %s succeeded in %.1fs (attempt %d)", job_id, time.perf_counter() - started, claim.attempt)
            pacs.start_deliveries(job_id)  # deliver_to: sent apart from the job (its status stays succeeded)
            return "succeeded"
        get_storage().delete_prefix(attempt_prefix(job_id, claim.attempt))
        log.warning("job %s: claim of attempt %d went stale; results discarded", job_id, claim.attempt)
        return "stale"
    except JobStopped:
        with session_scope() as session:
            cancelled = jobs.mark_cancelled(session, claim)
        # cancelled: no attempt's partial results are kept; claim lost: only ours (another attempt may win)
        get_storage().delete_prefix(attempt_prefix(job_id, None if cancelled else claim.attempt))
        log.info("job %s stopped (%s)", job_id, "cancelled" if cancelled else "claim lost")
        return "cancelled" if cancelled else "stale"
    except SoftTimeLimitExceeded:
        return _fail(claim, "time_limit", "the job ran past its time limit")
    except StorageError as exc:
        return _fail(claim, "storage_unavailable", str(exc), retry=True)
    except ValueError as exc:  # the model's and the readers' input errors are ValueErrors with a clear message
        code = ERROR_CODES.get(type(exc)) or str(getattr(exc, "code", "invalid_input"))  # DicomError carries its own
        return _fail(claim, code, str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _fail(claim, "synthesis_error", f"{type(exc).__name__}: {exc}")
    finally:
        runtime.release_memory()
        gc.collect()


def _fail(claim: jobs.Claim, code: str, message: str, retry: bool = False) -> str:
    if not (retry and claim.attempt < get_settings().jobs.max_attempts):
        try:  # every attempt's partial results: earlier attempts may have died mid-write
            get_storage().delete_prefix(attempt_prefix(claim.id))
        except StorageError:
            log.warning("could not delete the partial results of job %s", claim.id)
    return runtime.end_attempt(jobs.LEASES, claim, code=code, message=message, retry=retry,
                               max_attempts=get_settings().jobs.max_attempts, publish=publish_synthesis)


@app.task(name=SYNTHESIZE_TASK, acks_late=True, reject_on_worker_lost=True)
def synthesize(job_id: str) -> None:
    """Celery entry point: the message carries only the job id."""
    run_job(job_id)
