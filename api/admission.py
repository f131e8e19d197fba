"""Admission control: requests per key and minute (429 + Retry-After) and queue depth (503 / 429).

Counters must be shared by every API process, so they live in Redis when the broker is Redis (one INCR and
EXPIRE per request: atomic and cheap) and otherwise in the database (one upsert on ``rate_counter``: the
embedded stack's processes share the SQLite file). The `limits` library was not used: it has the same Redis
storage but no SQL one, so the embedded stack would have needed a second implementation anyway.
Fixed one-minute windows: a key can at most double its rate across a window boundary, which is fine for abuse
control. A counter store that is down does not block requests (logged): the dependency outage itself answers
503 where it matters.

The shared store is not written on every request. Each API process counts a key's hits itself and adds them to
the store (INCRBY / one upsert) when its estimate (the shared count it last read plus its own unsent hits)
reaches half the limit, or at least once a second (``SYNC_SECONDS``), and on the first hit of a window. Far from
the limit a status poll therefore costs no round trip; near it every hit is counted in the store at once, so
the limit stays exact for one or two processes (with P processes, a key can overshoot by at most
(P - 2) / 2 x the limit within one second). docs/benchmarks.md section 3 has the measured effect.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import lru_cache

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from api.core.errors import ProblemError, unavailable
from api.core.models import ApiKey, Job, JobStatus, RateCounter
from api.core.settings import get_settings

log = logging.getLogger(__name__)
WINDOW = 60
SYNC_SECONDS = 1.0


@lru_cache
def _redis(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def _add_redis(bucket: str, window: int, n: int) -> int:
    name = f"msgldm:rate:{bucket}:{window}"
    pipe = _redis(get_settings().broker.url).pipeline()
    pipe.incrby(name, n)
    pipe.expire(name, WINDOW * 2)
    return int(pipe.execute()[0])


def _add_db(session: Session, bucket: str, window: int, n: int) -> int:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = insert(RateCounter).values(bucket=bucket, window=window, count=n)
    stmt = stmt.on_conflict_do_update(index_elements=["bucket", "window"], set_={"count": RateCounter.count + n})
    count = session.execute(stmt.returning(RateCounter.count)).scalar_one()
    if count == n:  # the first hits of a window clear the windows before the last one
        session.execute(delete(RateCounter).where(RateCounter.window < window - 1))
    session.commit()
    return int(count)


class _Counts:
    """This process's view of each (bucket, window): the shared count it last read, its hits not yet added to
    the store, and when it last synchronised."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shared: dict[tuple[str, int], int] = {}
        self.pending: dict[tuple[str, int], int] = {}
        self.synced: dict[tuple[str, int], float] = {}
        self.window = 0

    def count(self, bucket: str, window: int, limit: int, now: float) -> tuple[int, int]:
        """One hit: ``(estimate, hits to add to the store now)`` (0: no round trip needed)."""
        with self.lock:
            if window != self.window:  # a new minute: forget the windows before it
                for d in (self.shared, self.pending, self.synced):
                    for k in [k for k in d if k[1] < window]:
                        del d[k]
                self.window = window
            key = (bucket, window)
            self.pending[key] = self.pending.get(key, 0) + 1
            estimate = self.shared.get(key, 0) + self.pending[key]
            if 2 * estimate >= limit or now - self.synced.get(key, -math.inf) >= SYNC_SECONDS:
                self.synced[key] = now
                return estimate, self.pending.pop(key)
            return estimate, 0

    def store(self, bucket: str, window: int, count: int) -> None:
        with self.lock:
            key = (bucket, window)
            self.shared[key] = max(self.shared.get(key, 0), count)


_counts = _Counts()


def hit(session: Session, bucket: str, limit: int) -> None:
    """Count one request in ``bucket``; 429 with Retry-After once ``limit`` per minute is exceeded."""
    if limit <= 0:
        return
    now = time.time()
    window = int(now // WINDOW)
    count, send = _counts.count(bucket, window, limit, time.monotonic())
    if send:
        try:
            if get_settings().broker.url.startswith(("redis://", "rediss://")):
                count = _add_redis(bucket, window, send)
            else:
                count = _add_db(session, bucket, window, send)
        except Exception as exc:  # noqa: BLE001 - see the module docstring: a dead counter store does not block
            session.rollback()
            log.warning("rate limiter unavailable (%s); request allowed", type(exc).__name__)
            return
        _counts.store(bucket, window, count)
        count += _counts.pending.get((bucket, window), 0)  # hits of other threads since (not yet sent)
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
