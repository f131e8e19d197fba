"""The Celery settings for long GPU tasks as they take effect, not as written (celery#7651: a configured
visibility timeout can silently not apply)."""

from __future__ import annotations

import socket

import pytest

from api.core.queue import SYNTHESIZE_TASK, make_celery
from api.core.settings import Settings


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def test_task_and_worker_options():
    import worker.tasks  # noqa: F401  (the worker imports its tasks at start: conf.include)
    from worker.app import app

    task = app.tasks[SYNTHESIZE_TASK]
    assert task.acks_late is True and task.reject_on_worker_lost is True
    assert task.ignore_result is True
    conf = app.conf
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.worker_proc_alive_timeout >= 60  # model loading in a new pool child is not a hung child
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_routes[SYNTHESIZE_TASK]["queue"] == "inference"
    assert {q.name for q in conf.task_queues} == {"inference", "training"}


@pytest.mark.skipif(not redis_up(), reason="Redis is not running on 127.0.0.1")
def test_effective_redis_visibility_timeout_exceeds_the_longest_job():
    settings = Settings(broker={"url": "redis://127.0.0.1:6379/7", "visibility_timeout": 7200})
    app = make_celery(settings)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert channel.visibility_timeout == 7200  # what the transport will actually use
    # one prefetched task can wait a whole run before its own: 2 x hard limit + margin
    assert settings.broker.visibility_timeout > 2 * settings.jobs.time_limit_seconds
