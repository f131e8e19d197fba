"""Both storage backends through one interface; a dead S3 endpoint is a StorageError (503), never a crash."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from api.core.settings import StorageSettings
from api.core.storage import LocalStorage, ObjectNotFound, S3Storage, StorageError
from tests.service.conftest import free_port


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path: Path):
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_server")
    s3 = S3Storage(StorageSettings(backend="s3", endpoint=endpoint, access_key="testing", secret_key="testing",
                                   bucket=f"b-{tmp_path.name[-8:].lower().replace('_', '-')}", region="us-east-1"))
    s3.ensure_bucket()
    return s3


def test_round_trip(storage, tmp_path: Path):
    storage.ping()
    storage.put_stream("jobs/a/inputs/t1.nii.gz", io.BytesIO(b"x" * 3000), 3000)
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    storage.put_file("jobs/a/results/r.json", src)
    assert storage.exists("jobs/a/results/r.json") and not storage.exists("jobs/a/nothing")
    assert storage.size("jobs/a/inputs/t1.nii.gz") == 3000
    assert b"".join(storage.open_stream("jobs/a/results/r.json")) == b"hello"
    assert storage.get_file("jobs/a/results/r.json", tmp_path / "out" / "r.json").read_bytes() == b"hello"
    assert storage.list_keys("jobs/a/") == ["jobs/a/inputs/t1.nii.gz", "jobs/a/results/r.json"]
    with pytest.raises(ObjectNotFound):
        storage.size("jobs/a/missing")
    assert storage.delete_prefix("jobs/a/") == 2 and storage.list_keys("jobs/") == []


def test_local_keys_cannot_escape_the_root(tmp_path: Path):
    with pytest.raises(ValueError, match="escapes"):
        LocalStorage(tmp_path).put_stream("../outside", io.BytesIO(b"x"))


def test_unreachable_s3_is_a_storage_error():
    dead = S3Storage(StorageSettings(backend="s3", endpoint=f"127.0.0.1:{free_port()}", bucket="b",
                                     region="us-east-1"))
    with pytest.raises(StorageError):
        dead.ping()
    with pytest.raises(StorageError):
        dead.put_stream("k", io.BytesIO(b"x"), 1)
