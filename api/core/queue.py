"""The Celery application shared by publisher (API) and consumer (worker); tasks are sent by name only.

The settings follow the spec for long GPU tasks (reliability.md 1.4): late acks, reject on worker lost
(bounded by the job's attempt cap in the database), prefetch 1, a visibility timeout longer than the
longest job, hard and soft time limits, training on its own queue, no result backend (the database holds
job state).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from celery import Celery
from kombu import Queue

from api.core.settings import Settings, get_settings

SYNTHESIZE_TASK = "msgldm.synthesize"
TRAIN_TASK = "msgldm.train"
DELIVER_TASK = "msgldm.deliver"  # a result to a DICOM node (docs/pacs.md); inference queue


class BrokerUnavailable(ConnectionError):
    """The task could not be published: the broker is down or refused it."""


def make_celery(settings: Settings) -> Celery:
    broker = settings.broker
    # The SQLAlchemy transport hands every transport option to create_engine(), so it gets none; it has no
    # visibility timeout either (an unacked message dies with its worker): the job reaper re-publishes.
    transport_options = {} if broker.url.startswith("sqla+") else {"visibility_timeout": broker.visibility_timeout}
    app = Celery("msgldm", broker=broker.url, set_as_current=False)
    app.conf.update(
        task_default_queue=broker.inference_queue,
        task_queues=[Queue(broker.inference_queue), Queue(broker.training_queue)],
        task_routes={SYNTHESIZE_TASK: {"queue": broker.inference_queue}, TRAIN_TASK: {"queue": broker.training_queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_soft_time_limit=settings.jobs.soft_time_limit_seconds,
        task_time_limit=settings.jobs.time_limit_seconds,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # The pool child loads the model before it reports up (worker_process_init): with Celery's 4 s default
        # a slow load (a loaded host, a large checkpoint) got every new child killed in a loop (fault tests).
        worker_proc_alive_timeout=120,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_pool_limit=4,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def _publish(task: str, object_id: str) -> None:
    try:
        get_celery().send_task(task, args=[object_id], retry=True,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # kombu raises OperationalError and friends; all mean "not published"
        raise BrokerUnavailable(f"could not publish {task} {object_id}: {type(exc).__name__}") from exc


def publish_synthesis(job_id: str) -> None:
    """Publish the synthesis task for a committed job row; the message carries only the job id."""
    _publish(SYNTHESIZE_TASK, job_id)


def publish_training(run_id: str) -> None:
    """Publish a training run (committed row) to the training queue: inference workers never see it."""
    _publish(TRAIN_TASK, run_id)


def publish_delivery(delivery_id: str) -> None:
    """Publish one delivery attempt (api.core.deliveries); on the inference queue, whose workers hold the results."""
    _publish(DELIVER_TASK, delivery_id)


def publish_or_undo(session: Any, row: Any, publish: Callable[[str], None],
                    cleanup: Callable[[], object] | None = None) -> None:
    """Publish the task of a committed ``row``; when that fails, delete the row (and run ``cleanup``) and re-raise,
    so that the client's retry (same Idempotency-Key) starts clean rather than finding a job nobody will run."""
    try:
        publish(row.id)
    except Exception:
        session.delete(row)
        session.commit()
        if cleanup is not None:
            cleanup()
        raise
