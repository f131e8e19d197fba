"""Fixtures for the service tests: the embedded stack and the real one (PostgreSQL, Redis, an S3 server),
real API and worker processes (the model checkpoint and the S3 server are in tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
BRATS = DATA / "brats2023_gli_00001_000"
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_caches() -> None:
    """Settings and everything built from them are cached per process; tests that change env clear them."""
    from api.core import db, queue, serving, settings, storage

    for fn in (settings.get_settings, db.get_engine, db.get_sessionmaker, storage.get_storage, queue.get_celery,
               serving.serving_modalities):
        fn.cache_clear()


def brats_files() -> dict[str, Path]:
    """The shared BraTS 2023 case, by model modality name."""
    if not BRATS.is_dir():
        pytest.skip(f"shared sample data not found at {BRATS}")
    names = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
    return {m: BRATS / f"BraTS-GLI-00001-000-{s}.nii.gz" for m, s in names.items()}


@dataclass
class Stack:
    """Environment for one configuration of the service (embedded or real servers)."""

    name: str
    env: dict[str, str]
    cleanup: list = field(default_factory=list)

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        clear_caches()


def embedded_stack(tmp: Path, checkpoint: Path) -> Stack:
    return Stack("embedded", {
        "MSGLDM_DATABASE__URL": f"sqlite:///{tmp / 'msgldm.db'}",
        "MSGLDM_BROKER__URL": f"sqla+sqlite:///{tmp / 'broker.db'}",
        "MSGLDM_STORAGE__BACKEND": "local",
        "MSGLDM_STORAGE__LOCAL_ROOT": str(tmp / "objects"),
        "MSGLDM_INFERENCE__CHECKPOINT": str(checkpoint),
    })


def _pg_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1), \
                socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def create_pg_database() -> tuple[str, callable]:
    from sqlalchemy import create_engine, text

    name = f"msgldm_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", drop


def real_stack(checkpoint: Path, s3_endpoint: str) -> Stack:
    if not _pg_available():
        pytest.skip("PostgreSQL and Redis are not running on 127.0.0.1")
    import redis

    url, drop = create_pg_database()
    redis_db = int(os.environ.get("MSGLDM_TEST_REDIS_DB", "7"))  # separate checkouts testing at once: separate dbs
    redis.Redis.from_url(f"{REDIS_URL}/{redis_db}").flushdb()
    stack = Stack("real", {
        "MSGLDM_DATABASE__URL": url,
        "MSGLDM_BROKER__URL": f"{REDIS_URL}/{redis_db}",
        "MSGLDM_STORAGE__BACKEND": "s3",
        "MSGLDM_STORAGE__ENDPOINT": s3_endpoint,
        "MSGLDM_STORAGE__ACCESS_KEY": "testing",
        "MSGLDM_STORAGE__SECRET_KEY": "testing",
        "MSGLDM_STORAGE__BUCKET": f"msgldm-{uuid.uuid4().hex[:12]}",  # moto keeps state per process
        "MSGLDM_STORAGE__REGION": "us-east-1",
        "MSGLDM_INFERENCE__CHECKPOINT": str(checkpoint),
    })
    from api.core.settings import StorageSettings
    from api.core.storage import S3Storage

    S3Storage(StorageSettings(backend="s3", endpoint=s3_endpoint, access_key="testing", secret_key="testing",
                              bucket=stack.env["MSGLDM_STORAGE__BUCKET"], region="us-east-1")).ensure_bucket()
    stack.cleanup.append(drop)
    return stack


@pytest.fixture(params=["embedded", "real"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, checkpoint: Path) -> Iterator[Stack]:
    """Both configurations of the same code: embedded defaults, and PostgreSQL + Redis + S3 on 127.0.0.1."""
    if request.param == "embedded":
        s = embedded_stack(tmp_path, checkpoint)
    else:
        s = real_stack(checkpoint, request.getfixturevalue("s3_server"))
    yield s
    clear_caches()
    for fn in s.cleanup:
        fn()


def run_cli(stack: Stack, *args: str) -> str:
    env = {**os.environ, **stack.env}
    out = subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def migrate_in_process(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process at the stack and migrate it (the CLI's `migrate` runs in the process fixtures)."""
    from api.cli import migrate

    stack.apply(monkeypatch)
    migrate()


def create_key(stack: Stack, role: str) -> str:
    return run_cli(stack, "keys", "create", "--name", f"test {role}", "--role", role).strip().splitlines()[-1]


@dataclass
class Service:
    base: str
    stack: Stack
    procs: dict[str, subprocess.Popen]
    logs: Path
    env: dict[str, str]

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs.glob("*.log"))


def start_process(name: str, args: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """SIGTERM to the process (Celery then stops its pool itself); SIGKILL to the whole group."""
    if proc.poll() is None:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "inference", "-c", "1",
            "--loglevel", "INFO", "-n", f"test-{uuid.uuid4().hex[:6]}@%h", *extra]


@contextmanager
def running_service(stack: Stack, tmp_path: Path) -> Iterator[Service]:
    """The API under uvicorn and one Celery worker, as real processes on the given stack (migrated first)."""
    run_cli(stack, "migrate")
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    env = {**os.environ, **stack.env, "MSGLDM_JOBS__REAPER_INTERVAL_SECONDS": "1", "MSGLDM_JOBS__LEASE_SECONDS": "15"}
    procs = {
        "api": start_process("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                                     "--port", str(port)], env, logs),
        "worker": start_process("worker", worker_args(), env, logs),
    }
    svc = Service(f"http://127.0.0.1:{port}", stack, procs, logs, env)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{svc.base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
            for p in procs.values():
                stop_process(p)
            pytest.fail(f"the service did not become ready\n{svc.log_text()}")
        time.sleep(0.5)
    try:
        yield svc
    finally:
        for p in procs.values():
            stop_process(p)


@pytest.fixture
def service(stack: Stack, tmp_path: Path) -> Iterator[Service]:
    """The API under uvicorn and one Celery worker, as real processes on the given stack."""
    with running_service(stack, tmp_path) as svc:
        yield svc


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 300, until=("succeeded", "failed", "cancelled")
                 ) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {until} in {timeout}s: {job}")


@pytest.fixture
def app_client(stack: Stack, monkeypatch: pytest.MonkeyPatch):
    """The API in-process (FastAPI TestClient) on a migrated database of the given stack."""
    from fastapi.testclient import TestClient

    migrate_in_process(stack, monkeypatch)
    from api.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client
    clear_caches()


def multipart(files: dict[str, Path], **fields: str) -> tuple[list, dict]:
    return ([(m, (p.name, p.read_bytes(), "application/gzip")) for m, p in files.items()], fields)




@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    """Three small co-registered volumes (fast to upload; the API only checks them)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    files = {}
    for m in ("t1", "t1ce", "t2"):
        path = tmp_path / f"{m}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((24, 24, 12)).astype(np.float32), np.eye(4)), path)
        files[m] = path
    return files
