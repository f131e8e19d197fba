"""The Celery worker: ``celery -A worker.app worker -Q inference -c 1`` (one process per GPU); training workers
consume ``-Q training`` (one per host: a run uses every GPU of the host through DDP).

The pool child loads the model after the fork (CUDA is never touched in the parent), then runs the
heartbeat and the reaper threads beside its tasks.
"""

from __future__ import annotations

import logging

from celery.signals import celeryd_after_setup, worker_process_init, worker_process_shutdown

from api.core.db import get_engine
from api.core.queue import get_celery
from api.core.settings import get_settings
from worker import runtime

app = get_celery()
app.conf.include = ["worker.tasks", "worker.training", "worker.pacs"]
log = logging.getLogger(__name__)


@celeryd_after_setup.connect
def _queues(instance: object, **_: object) -> None:
    """Remember the consumed queues before the fork: a training-only worker loads no serving model."""
    runtime.QUEUES.update(instance.app.amqp.queues.consume_from)  # type: ignore[attr-defined]


@worker_process_init.connect
def _child_start(**_: object) -> None:
    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    get_engine().dispose(close=False)  # connections inherited from the parent are not ours to use
    runtime.start()


@worker_process_shutdown.connect
def _child_stop(**_: object) -> None:
    runtime.stop()
