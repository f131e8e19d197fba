"""Per-process state of a worker child: the serving model (resolved per job), the heartbeat and the reapers.

The registry (api/core/registry.py) names the serving version; each job asks it, fetches that version's
checkpoint from object storage into a local cache on first use, and keeps the last few loaded synthesizers, so
a promotion or rollback takes effect from the next job without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.core import jobs, registry, training
from api.core.db import session_scope
from api.core.leases import Claim, Leases
from api.core.models import WorkerHeartbeat, utcnow
from api.core.queue import publish_synthesis, publish_training
from api.core.settings import get_settings
from api.core.storage import attempt_prefix, download_prefix, get_storage

if TYPE_CHECKING:
    from model.pipeline import Synthesizer

log = logging.getLogger(__name__)
_stop = threading.Event()
_state: dict[str, str | None] = {"model_version": None, "device": None}
QUEUES: set[str] = set()  # the queues this worker consumes (set in the parent by worker.app before the fork)
_loaded: OrderedDict[str, Synthesizer] = OrderedDict()  # version -> synthesizer, least recently used first
_lock = threading.Lock()


def end_attempt(leases: Leases[Any], claim: Claim, *, code: str, message: str, retry: bool, max_attempts: int,
                publish: Callable[[str], Any], **values: Any) -> str:
    """A failed attempt of a job or training run: back to the queue (and re-published) when ``retry`` and attempts
    remain, else failed with ``code``; returns "requeued" or "failed"."""
    retry = retry and claim.attempt < max_attempts
    with session_scope() as session:
        leases.fail(session, claim, code=code, message=message, retry=retry, **values)
    if retry:
        publish(claim.id)
    log.warning("%s %s attempt %d: %s (%s)%s", leases.noun, claim.id, claim.attempt, code, message[:500],
                " - re-queued" if retry else "")
    return "requeued" if retry else "failed"


def serves_inference() -> bool:
    return not QUEUES or get_settings().broker.inference_queue in QUEUES


def _load(path: Path, expected: str | None = None) -> Synthesizer:
    from model.pipeline import Synthesizer

    settings = get_settings().inference
    synth = Synthesizer.from_pretrained(path, device=settings.device, precision=settings.precision)
    if expected is not None and synth.version != expected:
        from model.errors import CheckpointError

        raise CheckpointError(f"the checkpoint at {path} is {synth.version}, not the registered {expected}")
    _state["device"] = str(getattr(synth, "device", settings.device))
    log.info("model %s loaded from %s on %s", synth.version, path, _state["device"])
    return synth


def _fetch(version: str, prefix: str) -> Path:
    """The version's checkpoint folder in the local cache, downloaded from object storage on first use."""
    dest = get_settings().inference.cache_dir / version
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(f".{version}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    storage = get_storage()
    download_prefix(storage, prefix, tmp)
    if not (tmp / "config.json").is_file():
        from model.errors import CheckpointError

        raise CheckpointError(f"model version {version}: no checkpoint under {prefix} in object storage")
    try:
        tmp.rename(dest)  # atomic: another process sees a complete folder or none
    except OSError:  # another worker process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _register_configured() -> Synthesizer:
    """No version registered yet: serve the configured checkpoint and register it as the serving version."""
    path = get_settings().inference.checkpoint
    synth = _load(path)
    _remember(synth.version, synth)
    config = json.loads((path / "config.json").read_text())
    with session_scope() as session:  # no registry metrics: it was not evaluated by a training run here
        registry.register_initial(session, version=synth.version, local_path=str(path), preset=config.get("name"),
                                  modalities=list(config.get("modalities") or []), metrics={})
    return synth


def _remember(version: str, synth: Synthesizer) -> Synthesizer:
    _loaded[version] = synth
    _loaded.move_to_end(version)
    while len(_loaded) > max(1, get_settings().inference.max_loaded_models):
        evicted, _ = _loaded.popitem(last=False)
        log.info("model %s unloaded (LRU)", evicted)
        release_memory()
    return synth


def get_synthesizer() -> Synthesizer:
    """The synthesizer of the version the registry says serves now (asked on every call: one small query)."""
    with _lock:
        with session_scope() as session:
            row = registry.serving(session)
            version, prefix, local = (row.version, row.storage_prefix, row.local_path) if row else (None, None, None)
        if version is None:
            synth = _register_configured()
        elif version in _loaded:
            synth = _remember(version, _loaded[version])
        else:
            path = _fetch(version, prefix) if prefix else Path(local or get_settings().inference.checkpoint)
            synth = _remember(version, _load(path, expected=version))
        _state["model_version"] = synth.version
        return synth


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat() -> None:
    with session_scope() as session:
        row = session.get(WorkerHeartbeat, worker_id())
        if row is None:
            queues = ",".join(sorted(QUEUES)) or get_settings().broker.inference_queue
            row = WorkerHeartbeat(worker_id=worker_id(), queues=queues[:200])
            session.add(row)
        row.seen_at, row.model_version, row.device = utcnow(), _state["model_version"], _state["device"]


def reap() -> None:
    settings = get_settings()
    with session_scope() as session:
        requeued, failed = jobs.reap_expired(session, max_attempts=settings.jobs.max_attempts)
        stale = jobs.stale_queued(session, older_than=timedelta(seconds=settings.broker.visibility_timeout))
    for job_id in requeued + stale:
        publish_synthesis(job_id)
    for job_id in failed:  # failed or cancelled for good: partial results of dead attempts go
        get_storage().delete_prefix(attempt_prefix(job_id))
    if requeued or failed or stale:
        log.warning("reaper: re-queued %s, failed %s, re-published %s", requeued, failed, stale)
    with session_scope() as session:
        requeued, failed = training.reap_expired(session, max_attempts=settings.training.max_attempts)
        stale = training.stale_queued(session, older_than=timedelta(seconds=settings.broker.visibility_timeout))
    for run_id in requeued + stale:
        publish_training(run_id)
    if requeued or failed or stale:
        log.warning("reaper: training runs re-queued %s, failed %s, re-published %s", requeued, failed, stale)
    if serves_inference():
        from worker.pacs import publish_due

        if due := publish_due():  # deliveries whose next attempt is due (or whose message was lost)
            log.info("reaper: published deliveries %s", due)


def _loop() -> None:
    interval = get_settings().jobs.reaper_interval_seconds
    while not _stop.is_set():
        for fn in (heartbeat, reap):
            try:
                fn()
            except Exception:  # noqa: BLE001 - a dependency outage must not kill the loop
                log.warning("%s failed; retrying in %.0fs", fn.__name__, interval, exc_info=True)
        _stop.wait(interval)


def start() -> None:
    """Load the serving model (inference workers), then keep a heartbeat and the reapers going until the end."""
    _stop.clear()
    if serves_inference():
        try:
            get_synthesizer()
        except Exception:  # noqa: BLE001 - reported through /readyz (no model) and each job's error
            log.exception("the serving model could not be loaded")
    threading.Thread(target=_loop, name="heartbeat-reaper", daemon=True).start()


def stop() -> None:
    _stop.set()


def device_name() -> str | None:
    return _state["device"]


def release_memory() -> None:
    """Give cached GPU memory back after a job (a cancelled or failed job frees what it held)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
