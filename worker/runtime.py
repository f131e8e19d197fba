"""Per-process state of a worker child: the model (loaded once), the heartbeat and the reaper."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING

from api.core import jobs
from api.core.db import session_scope
from api.core.models import WorkerHeartbeat, utcnow
from api.core.queue import publish_synthesis
from api.core.settings import get_settings

if TYPE_CHECKING:
    from model.pipeline import Synthesizer

log = logging.getLogger(__name__)
_stop = threading.Event()
_state: dict[str, str | None] = {"model_version": None, "device": None}


@lru_cache(maxsize=1)
def get_synthesizer() -> Synthesizer:
    """The serving model, loaded once per process on CUDA when present, else CPU."""
    from model.pipeline import Synthesizer

    settings = get_settings().inference
    synth = Synthesizer.from_pretrained(settings.checkpoint, device=settings.device, precision=settings.precision)
    _state["model_version"], _state["device"] = synth.version, str(getattr(synth, "device", settings.device))
    log.info("model %s loaded from %s on %s", synth.version, settings.checkpoint, _state["device"])
    return synth


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat() -> None:
    with session_scope() as session:
        row = session.get(WorkerHeartbeat, worker_id())
        if row is None:
            row = WorkerHeartbeat(worker_id=worker_id(), queues=get_settings().broker.inference_queue)
            session.add(row)
        row.seen_at, row.model_version, row.device = utcnow(), _state["model_version"], _state["device"]


def reap() -> None:
    settings = get_settings()
    with session_scope() as session:
        requeued, failed = jobs.reap_expired(session, max_attempts=settings.jobs.max_attempts)
        stale = jobs.stale_queued(session, older_than=timedelta(seconds=settings.broker.visibility_timeout))
    for job_id in requeued + stale:
        publish_synthesis(job_id)
    if requeued or failed or stale:
        log.warning("reaper: re-queued %s, failed %s, re-published %s", requeued, failed, stale)


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
    """Load the model, then keep a heartbeat and the reaper going until the process stops."""
    _stop.clear()
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
