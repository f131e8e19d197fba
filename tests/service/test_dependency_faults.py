"""Faults with real processes on a private stack (its own redis-server, PostgreSQL cluster and moto S3 server,
which these tests stop and kill; uvicorn and Celery workers as processes): S3, Redis and PostgreSQL outages
answer 503 with Retry-After (never 500) and lose no job; storage failing under a job ends it `failed` with a
code after the bounded attempts; a worker frozen past its lease is replaced and its late completion rejected;
a job whose pool child is killed on every attempt ends `failed` (worker_lost) while other jobs flow. Every test
ends with the invariant checker (tests/service/fault_servers.py)."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    brats_files,
    free_port,
    run_cli,
    start_process,
    stop_process,
    worker_args,
)
from tests.service.fault_servers import PgCluster, RedisServer, S3Server, check_invariants, servers_missing

pytestmark = pytest.mark.slow
LEASE = 6


@dataclass
class Faults:
    env: dict[str, str]
    redis: RedisServer
    pg: PgCluster
    s3: S3Server
    procs: dict[str, object]
    logs: Path
    base: str
    key: str
    study: dict[str, bytes]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    def submit(self, client: httpx.Client, steps: int = 1) -> str:
        r = client.post("/api/v1/synthesize", data={"targets": "flair", "steps": str(steps)},
                        files=[(m, (f"{m}.nii.gz", data)) for m, data in self.study.items()])
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait(self, client: httpx.Client, job_id: str, until=("succeeded", "failed", "cancelled"),
             timeout: float = 120, field: str = "status") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = client.get(f"/api/v1/jobs/{job_id}")
            if r.status_code == 200 and r.json()[field] in until:
                return r.json()
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} never reached {until}: {r.text}\n{self.log_text()}")

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs.glob("*.log"))

    def start_worker(self, name: str) -> None:
        self.procs[name] = start_process(name, worker_args(), self.env, self.logs)

    def signal_worker(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)  # type: ignore[attr-defined]

    def invariants(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
        from tests.service.conftest import clear_caches

        for k, v in self.env.items():
            if k.startswith("MSGLDM_"):
                monkeypatch.setenv(k, v)
        clear_caches()
        from api.core.storage import get_storage

        return check_invariants(get_storage())


def _study() -> dict[str, bytes]:
    import nibabel as nib

    files = brats_files()
    return {m: gzip.compress(nib.load(files[m]).slicer[:, :, 76:80].to_bytes(), compresslevel=1)
            for m in ("t1", "t2")}


@pytest.fixture(scope="module")
def faults(tmp_path_factory, checkpoint) -> Iterator[Faults]:
    if reason := servers_missing():
        pytest.skip(reason)
    study = _study()
    tmp = tmp_path_factory.mktemp("faults")
    redis, pg, s3 = RedisServer(tmp), PgCluster(), S3Server()
    redis.start()
    pg.init()
    pg.start()
    s3.start()
    logs = tmp / "logs"
    logs.mkdir()
    bucket = f"msgldm-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MSGLDM_DATABASE__URL": pg.url, "MSGLDM_BROKER__URL": redis.url,
           "MSGLDM_BROKER__VISIBILITY_TIMEOUT": "30", "MSGLDM_STORAGE__BACKEND": "s3",
           "MSGLDM_STORAGE__ENDPOINT": s3.endpoint, "MSGLDM_STORAGE__ACCESS_KEY": "testing",
           "MSGLDM_STORAGE__SECRET_KEY": "testing", "MSGLDM_STORAGE__BUCKET": bucket,
           "MSGLDM_STORAGE__REGION": "us-east-1", "MSGLDM_INFERENCE__CHECKPOINT": str(checkpoint),
           "MSGLDM_JOBS__LEASE_SECONDS": str(LEASE), "MSGLDM_JOBS__REAPER_INTERVAL_SECONDS": "1",
           "MSGLDM_JOBS__MAX_ATTEMPTS": "3", "MSGLDM_API__WORKER_HEARTBEAT_SECONDS": "5"}
    from api.core.settings import StorageSettings
    from api.core.storage import S3Storage

    S3Storage(StorageSettings(backend="s3", endpoint=s3.endpoint, access_key="testing", secret_key="testing",
                              bucket=bucket, region="us-east-1")).ensure_bucket()
    from tests.service.conftest import Stack

    stack = Stack("faults", {k: v for k, v in env.items() if k.startswith("MSGLDM_")})
    run_cli(stack, "migrate")
    key = run_cli(stack, "keys", "create", "--name", "faults", "--role", "integrator").strip().splitlines()[-1]
    port = free_port()
    procs = {"api": start_process("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                                          "--port", str(port)], env, logs)}
    f = Faults(env, redis, pg, s3, procs, logs, f"http://127.0.0.1:{port}", key, study)
    f.start_worker("worker")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{f.base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready\n{f.log_text()}"
            time.sleep(0.3)
        yield f
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)  # type: ignore[attr-defined]
            stop_process(proc)  # type: ignore[arg-type]
        s3.stop()
        redis.kill9()
        pg.remove()


def _problem_503(r: httpx.Response, code: str) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json") and r.json()["code"] == code
    assert int(r.headers["retry-after"]) > 0


def test_s3_down_is_503_and_nothing_is_lost(faults, monkeypatch):
    with faults.client() as client:
        before = len(client.get("/api/v1/jobs").json()["items"])
        faults.s3.stop()
        try:
            r = client.post("/api/v1/synthesize", data={"targets": "flair"},
                            files=[(m, (f"{m}.nii.gz", d)) for m, d in faults.study.items()])
            _problem_503(r, "storage_unavailable")
            assert client.get("/api/v1/jobs").status_code == 200  # reads that need no storage still work
            assert len(client.get("/api/v1/jobs").json()["items"]) == before  # no half-created job
        finally:
            faults.s3.start()
        job = faults.wait(client, faults.submit(client))
        assert job["status"] == "succeeded", job
    faults.invariants(monkeypatch)


def test_storage_down_under_a_job_fails_it_after_bounded_retries(faults, monkeypatch):
    """The worker cannot read the inputs: each attempt re-queues with storage_unavailable until the attempt
    limit, then the job is `failed` with that code; after the outage, jobs run again."""
    with faults.client() as client:
        faults.signal_worker("worker", signal.SIGSTOP)
        job_id = faults.submit(client)
        faults.s3.stop()
        faults.signal_worker("worker", signal.SIGCONT)
        try:
            job = faults.wait(client, job_id)
        finally:
            faults.s3.start()
        assert job["status"] == "failed" and job["error"]["code"] == "storage_unavailable", job
        assert job["attempts"] == 3
        assert faults.wait(client, faults.submit(client))["status"] == "succeeded"
    faults.invariants(monkeypatch)


def test_redis_killed_with_jobs_queued(faults, monkeypatch):
    """kill -9 of Redis with two jobs queued: 503 broker_unavailable meanwhile (no job row left behind); after
    the restart (append-only file) both queued jobs and a new one complete: the worker consumes again."""
    with faults.client() as client:
        faults.signal_worker("worker", signal.SIGSTOP)  # the jobs stay queued in Redis
        queued = [faults.submit(client), faults.submit(client)]
        before = {j["id"] for j in client.get("/api/v1/jobs", params={"limit": 200}).json()["items"]}
        faults.redis.kill9()
        try:
            r = client.post("/api/v1/synthesize", data={"targets": "flair"},
                            files=[(m, (f"{m}.nii.gz", d)) for m, d in faults.study.items()])
            _problem_503(r, "broker_unavailable")
            after = {j["id"] for j in client.get("/api/v1/jobs", params={"limit": 200}).json()["items"]}
            assert after == before
        finally:
            faults.redis.start()
            faults.signal_worker("worker", signal.SIGCONT)
        for job_id in queued:
            assert faults.wait(client, job_id, timeout=180)["status"] == "succeeded"
        assert faults.wait(client, faults.submit(client), timeout=120)["status"] == "succeeded"
    faults.invariants(monkeypatch)


def test_postgres_restart(faults, monkeypatch):
    """PostgreSQL stopped (immediate mode, i.e. crash recovery on start): 503 database_unavailable for reads and
    submissions; after the restart the API answers again within 10 s and jobs run (worker survived)."""
    with faults.client() as client:
        existing = {j["id"] for j in client.get("/api/v1/jobs", params={"limit": 200}).json()["items"]}
        faults.pg.stop("immediate")
        try:
            _problem_503(client.get("/api/v1/jobs"), "database_unavailable")
            r = client.post("/api/v1/synthesize", data={"targets": "flair"},
                            files=[(m, (f"{m}.nii.gz", d)) for m, d in faults.study.items()])
            _problem_503(r, "database_unavailable")
        finally:
            faults.pg.start()
        restarted = time.monotonic()
        while client.get("/api/v1/jobs").status_code != 200:
            assert time.monotonic() - restarted < 10, "the API did not recover within 10 s"
            time.sleep(0.2)
        ids = {j["id"] for j in client.get("/api/v1/jobs", params={"limit": 200}).json()["items"]}
        assert ids == existing  # every committed row survived, nothing half-made appeared
        assert faults.wait(client, faults.submit(client), timeout=120)["status"] == "succeeded"
    faults.invariants(monkeypatch)


def _worker_pid(job_id: str, faults: Faults, monkeypatch) -> int:
    from tests.service.conftest import clear_caches

    for k, v in faults.env.items():
        if k.startswith("MSGLDM_"):
            monkeypatch.setenv(k, v)
    clear_caches()
    from api.core.db import session_scope
    from api.core.models import Job

    with session_scope() as session:
        return int(session.get(Job, job_id).worker_id.rsplit(":", 1)[1])


def _owner(pid: int, faults: Faults) -> str:
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return next(name for name, p in faults.procs.items() if p.pid in (pid, ppid))  # type: ignore[attr-defined]


def test_worker_frozen_past_its_lease(faults, monkeypatch):
    """SIGSTOP the worker running a job: its lease expires, the other worker's reaper re-queues it and it runs
    again (attempt 2); SIGCONT: the frozen worker's late work is rejected by the fencing token, its partial
    results deleted; one result set remains."""
    faults.start_worker("worker-b")
    try:
        with faults.client() as client:
            job_id = faults.submit(client, steps=60)
            faults.wait(client, job_id, until=("denoise",), field="phase")
            frozen = _owner(_worker_pid(job_id, faults, monkeypatch), faults)
            faults.signal_worker(frozen, signal.SIGSTOP)
            try:
                job = faults.wait(client, job_id, until=(2,), field="attempts", timeout=LEASE + 60)
            finally:
                faults.signal_worker(frozen, signal.SIGCONT)
            job = faults.wait(client, job_id, timeout=300)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            assert set(job["results"]) == {"flair.nii.gz", "record.json", "preview.png", "report.html"}, job
            deadline = time.monotonic() + 30
            log = faults.logs / f"{frozen}.log"
            while "claim lost" not in log.read_text() and "went stale" not in log.read_text():
                assert time.monotonic() < deadline, f"the frozen worker never gave up its claim\n{faults.log_text()}"
                time.sleep(0.5)
        stats = faults.invariants(monkeypatch)
        from api.core.storage import get_storage

        keys = [k for k in get_storage().list_keys(f"jobs/{job_id}/") if "/inputs/" not in k]
        assert keys and all("/attempt-2/" in k for k in keys), (keys, stats)
    finally:
        stop_process(faults.procs.pop("worker-b"), signal.SIGKILL)  # type: ignore[arg-type]


def test_job_that_kills_its_pool_child_every_time(faults, monkeypatch):
    """kill -9 of the pool child (the OOM killer's way) on each attempt: the message is re-queued (reject on
    worker lost), the attempt cap ends the job `failed` with worker_lost after 3 attempts, the parent replaces
    its child, and the next job succeeds."""
    with faults.client() as client:
        job_id = faults.submit(client, steps=400)
        for attempt in (1, 2, 3):
            faults.wait(client, job_id, until=(attempt,), field="attempts", timeout=120)
            faults.wait(client, job_id, until=("denoise", "encode", "decode"), field="phase", timeout=120)
            os.kill(_worker_pid(job_id, faults, monkeypatch), signal.SIGKILL)
        job = faults.wait(client, job_id, timeout=LEASE + 60)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost" and job["attempts"] == 3, job
        assert faults.procs["worker"].poll() is None  # type: ignore[attr-defined]
        assert faults.wait(client, faults.submit(client), timeout=180)["status"] == "succeeded"
    faults.invariants(monkeypatch)
