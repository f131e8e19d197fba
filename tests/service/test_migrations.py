"""Migrations upgrade and downgrade cleanly on SQLite and PostgreSQL, and match the ORM models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect

from tests.service.conftest import ROOT, _pg_available, create_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    if not _pg_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1")
    url, drop = create_pg_database()
    yield url
    drop()


def test_upgrade_downgrade_roundtrip(database_url: str):
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", database_url)
    engine = create_engine(database_url)
    command.upgrade(config, "head")
    assert {"job", "api_key", "worker_heartbeat"} <= set(inspect(engine).get_table_names())
    command.check(config)  # the models and the migrations agree
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    engine.dispose()
