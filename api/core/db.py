"""Engine, sessions and the declarative base. The schema itself changes only through Alembic migrations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, event, exc
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from api.core.settings import get_settings

PING_AFTER_IDLE_SECONDS = 1.0
READS_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT", "begin_on_write": True}

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def make_engine(url: str, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's writes
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(url, echo=echo, pool_size=10, max_overflow=20)
    ping_error = engine.dialect.loaded_dbapi.Error

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy):  # type: ignore[no-untyped-def]
        """Pre-ping only connections idle for over a second: one back from a request a moment ago is alive, and
        pinging it cost a round trip per request. A statement that still meets a dead connection (the database
        restarted within that second) fails once (503) and invalidates the whole pool."""
        returned = record.info.get("returned_at")
        if returned is not None and time.monotonic() - returned > PING_AFTER_IDLE_SECONDS:
            try:
                engine.dialect.do_ping(dbapi_conn)
            except ping_error as err:
                raise exc.InvalidatePoolError() from err  # the pool reconnects (or raises: database down)

    @event.listens_for(engine, "before_cursor_execute")
    def _begin_on_write(conn, cursor, statement, *_: Any):  # type: ignore[no-untyped-def]
        """A ``READS_AUTOCOMMIT`` connection leaves autocommit at its first statement that is not a plain SELECT
        (a write, or a locking read): psycopg sends BEGIN before it, and the session's commit or rollback ends
        that transaction as it would have without autocommit."""
        if (cursor.connection.autocommit and conn.get_execution_options().get("begin_on_write")
                and not (statement.startswith("SELECT") and " FOR " not in statement)):
            cursor.connection.autocommit = False

    return engine


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(settings.database.url, settings.database.echo)


@lru_cache
def get_sessionmaker(reads_autocommit: bool = False) -> sessionmaker[Session]:
    """``reads_autocommit`` (the API's request sessions): on PostgreSQL, reads run in autocommit until the
    session's first write begins a transaction (``READS_AUTOCOMMIT``), so a request that only reads sends no
    BEGIN and no ROLLBACK."""
    engine = get_engine()
    if reads_autocommit and engine.dialect.name == "postgresql":
        engine = engine.execution_options(**READS_AUTOCOMMIT)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (worker and CLI use)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
