"""Admission control: requests per key and minute (429 + Retry-After) and queue depth (503 / 429).

Counters must be shared by every API process, so they live in Redis when the broker is Redis (one INCR and
EXPIRE per request: atomic and cheap) and otherwise in the database (one upsert on ``rate_counter``: the
embedded stack's processes share the SQLite file). The `limits` library was not used: it has the same Redis
storage but no SQL one, so the embedded stack would have needed a second implementation anyway.
Fixed one-minute windows: a key can at most double its rate across a window boundary, which is fine for abuse
control. A counter store that is down does not block requests (logged): the dependency outage itself answers
503 where it matters.
"""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from api.core.models import ApiKey, Job, JobStatus, RateCounter
from api.core.settings import get_settings
from api.errors import ProblemError, unavailable

log = logging.getLogger(__name__)
WINDOW = 60


@lru_cache
def _redis(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _count_redis(bucket: str, window: int) -> int:
    name = f"msgldm:rate:{bucket}:{window}"
    pipe = _redis(get_settings().broker.url).pipeline()
    pipe.incr(name)
    pipe.expire(name, WINDOW * 2)
    return int(pipe.execute()[0])


def _count_db(session: Session, bucket: str, window: int) -> int:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(RateCounter).values(bucket=bucket, window=window, count=1)
    stmt = stmt.on_conflict_do_update(index_elements=["bucket", "window"], set_={"count": RateCounter.count + 1})
    count = session.execute(stmt.returning(RateCounter.count)).scalar_one()
    if count == 1:  # the first request of a window clears the windows before the last one
        session.execute(delete(RateCounter).where(RateCounter.window < window - 1))
    session.commit()
    return int(count)


def hit(session: Session, bucket: str, limit: int) -> None:
    """Count one request in ``bucket``; 429 with Retry-After once ``limit`` per minute is exceeded."""
    if limit <= 0:
        return
    now = time.time()
    window = int(now // WINDOW)
    try:
        if get_settings().broker.url.startswith(("redis://", "rediss://")):
            count = _count_redis(bucket, window)
        else:
            count = _count_db(session, bucket, window)
    except Exception as exc:  # noqa: BLE001 - see the module docstring: a dead counter store does not block
        session.rollback()
        log.warning("rate limiter unavailable (%s); request allowed", type(exc).__name__)
        return
    if count > limit:
        retry = max(1, math.ceil((window + 1) * WINDOW - now))
        raise ProblemError(429, "rate_limited", f"more than {limit} requests per minute for this key; "
                                                f"retry in {retry} s", headers={"Retry-After": str(retry)})


def admit_submission(session: Session, key: ApiKey) -> None:
    """Before a study is read: the key's submission rate, its active jobs, and the queue's depth."""
    api = get_settings().api
    hit(session, f"submit:{key.id}", api.submit_rate_limit_per_minute)
    if api.max_active_jobs_per_key > 0:
        active = session.execute(select(func.count()).select_from(Job).where(
            Job.owner_id == key.id, Job.status.in_((JobStatus.queued, JobStatus.running)))).scalar_one()
        if active >= api.max_active_jobs_per_key:
            raise ProblemError(429, "too_many_active_jobs", f"this key has {active} queued or running jobs (at most "
                                                            f"{api.max_active_jobs_per_key}); retry when some end",
                               headers={"Retry-After": "30"})
    if api.max_queued_jobs > 0:
        queued = session.execute(select(func.count()).select_from(Job).where(Job.status == JobStatus.queued)
                                 ).scalar_one()
        if queued >= api.max_queued_jobs:
            err = unavailable("queue_full", f"{queued} jobs are queued (at most {api.max_queued_jobs}); retry later")
            err.headers["Retry-After"] = "30"
            raise err
