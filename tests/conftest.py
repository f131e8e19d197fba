"""Session fixtures shared by tests/service and tests/ui: a tiny model checkpoint and an S3 server; the
hypothesis profile."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.service.conftest import free_port

# CI (CI=true, as .ci/run is called) replays the same examples every run, so that a red build always means a
# change broke something; on a developer's machine the property tests keep exploring new examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")



@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny checkpoint with random weights: the service tests check plumbing, not quality."""
    from model.checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-random", seed=0)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3-compatible server on loopback (moto in server mode; MinIO cannot be installed here)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()
