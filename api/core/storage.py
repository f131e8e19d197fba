"""Object storage behind one interface: a local directory (embedded) or S3/MinIO through the minio client.

Keys are opaque strings such as ``jobs/{job_id}/inputs/t1.nii.gz``; the database stores keys, never URLs. Every
key is spelled by the functions below (the one place of the key grammar).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Protocol

from api.core.settings import StorageSettings, get_settings

CHUNK = 1024 * 1024


def job_prefix(job_id: str) -> str:
    """Everything of one job: its inputs and every attempt's results."""
    return f"jobs/{job_id}/"


def job_input_key(job_id: str, name: str) -> str:
    """An uploaded or pulled input: ``t1.nii.gz``, or ``t1/00000.dcm`` for a DICOM series' instances."""
    return f"jobs/{job_id}/inputs/{name}"


def attempt_prefix(job_id: str, attempt: int | None = None) -> str:
    """One attempt's results (``attempt``), or with None the prefix of every attempt's."""
    return f"jobs/{job_id}/attempt-" + (f"{attempt}/" if attempt is not None else "")


def model_prefix(version: str) -> str:
    """A registered model version's checkpoint files."""
    return f"models/{version}/"


def training_run_prefix(run_id: str, part: str) -> str:
    """A training run's ``checkpoint`` (resumable stage checkpoints) or ``evaluation`` (its report) files."""
    return f"training-runs/{run_id}/{part}/"


class StorageError(OSError):
    """The object store could not be reached or refused an operation."""


class ObjectNotFound(KeyError):
    """No object under this key."""


class Storage(Protocol):
    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> None: ...
    def put_file(self, key: str, src: Path) -> None: ...
    def get_file(self, key: str, dest: Path) -> Path: ...
    def open_stream(self, key: str) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def ping(self) -> None: ...


class LocalStorage:
    """Objects as files under ``root``; writes go through a temporary file and an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()) or key.startswith("/"):
            raise ValueError(f"object key escapes the storage root: {key!r}")
        return path

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(stream, out, CHUNK)
        os.replace(tmp, path)

    def put_file(self, key: str, src: Path) -> None:
        with open(src, "rb") as f:
            self.put_stream(key, f)

    def get_file(self, key: str, dest: Path) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        return dest

    def open_stream(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    yield block

        return chunks()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root.resolve()
        if not base.exists():
            return []
        return sorted(
            p.relative_to(base).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.relative_to(base).as_posix().startswith(prefix)
        )

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        return len(keys)

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage root is not writable: {self.root}")


class S3Storage:
    """MinIO or any S3-compatible server, through the ``minio`` client."""

    def __init__(self, cfg: StorageSettings) -> None:
        from minio import Minio
        from urllib3 import PoolManager, Retry, Timeout

        http = PoolManager(timeout=Timeout(connect=3, read=60), retries=Retry(total=2, backoff_factor=0.2))
        self.client = Minio(
            cfg.endpoint,
            access_key=cfg.access_key,
            secret_key=cfg.secret_key,
            secure=cfg.secure,
            region=cfg.region,
            http_client=http,
        )
        self.bucket = cfg.bucket

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(args[1] if len(args) > 1 else "") from exc
            raise StorageError(f"object storage refused {fn.__name__}: {exc.code}") from exc
        except (OSError, ValueError, HTTPError) as exc:  # connection refused, retries exhausted, bad answers
            raise StorageError(f"object storage unreachable during {fn.__name__}: {exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1) -> None:
        part = 10 * 1024 * 1024 if length < 0 else 0
        self._call(self.client.put_object, self.bucket, key, stream, length, part_size=part)

    def put_file(self, key: str, src: Path) -> None:
        self._call(self.client.fput_object, self.bucket, key, str(src))

    def get_file(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._call(self.client.fget_object, self.bucket, key, str(dest))
        return dest

    def open_stream(self, key: str) -> Iterator[bytes]:
        response = self._call(self.client.get_object, self.bucket, key)

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(CHUNK)
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def size(self, key: str) -> int:
        return int(self._call(self.client.stat_object, self.bucket, key).size)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def list_keys(self, prefix: str) -> list[str]:
        objects = self._call(self.client.list_objects, self.bucket, prefix=prefix, recursive=True)
        return sorted(o.object_name for o in self._call(list, objects))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self._call(self.client.remove_object, self.bucket, key)
        return len(keys)

    def ping(self) -> None:
        if not self._call(self.client.bucket_exists, self.bucket):
            raise StorageError(f"bucket {self.bucket!r} does not exist")

    def ensure_bucket(self) -> None:
        if not self._call(self.client.bucket_exists, self.bucket):
            self._call(self.client.make_bucket, self.bucket)


def make_storage(cfg: StorageSettings) -> Storage:
    if cfg.backend == "s3":
        return S3Storage(cfg)
    return LocalStorage(cfg.local_root)


@lru_cache
def get_storage() -> Storage:
    return make_storage(get_settings().storage)


def download_prefix(storage: Storage, prefix: str, dest: Path) -> list[str]:
    """Every object under ``prefix`` (a folder: a trailing ``/`` is added) into ``dest``, keeping the relative
    paths; returns the keys."""
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    keys = storage.list_keys(prefix)
    for key in keys:
        storage.get_file(key, dest / key[len(prefix):])
    return keys
