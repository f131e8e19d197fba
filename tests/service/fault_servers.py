"""Servers that fault tests may kill: a private redis-server, a private PostgreSQL cluster (initdb in a temporary
directory) and a private moto S3 server, each on a free loopback port. The shared servers are never touched.
Also the invariant checker that every fault test ends with."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.service.conftest import free_port


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, or where Debian installs it (/usr/lib/postgresql/<major>/bin)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(candidates[-1]) if candidates else None


def servers_missing() -> str | None:
    """Why the private servers cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (initdb refuses root)"
    return None


def _wait(check, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout}s")
        time.sleep(0.1)


@dataclass
class RedisServer:
    """redis-server with an fsync-always append-only file, so that kill -9 loses no acknowledged write."""

    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction",
             "--logfile", str(self.dir / "redis.log")], start_new_session=True)
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        _wait(up, "redis-server")

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class PgCluster:
    """A throwaway PostgreSQL cluster (trust auth on 127.0.0.1), run as the postgres user when we are root."""

    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="msgldm-pg-")))
    port: int = field(default_factory=free_port)

    def _run(self, binary: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, pg_bin(binary) or binary, *args], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "-A", "trust", "--no-instructions")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class S3Server:
    """moto in server mode on a fixed port; stop() closes the socket so that clients are refused, not hung."""

    port: int = field(default_factory=free_port)
    server: object | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # type: ignore[attr-defined]
            self.server._server.server_close()  # type: ignore[attr-defined]
            self.server = None


def check_invariants(storage) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """After a fault: no `running` job with an expired lease, no `succeeded` job without every result object,
    no object of a job that does not exist, no result object that no succeeded job references."""
    from sqlalchemy import select

    from api.core.db import session_scope
    from api.core.models import Job, JobStatus, utcnow

    with session_scope() as session:
        jobs = {j.id: j for j in session.execute(select(Job)).scalars()}
    now = utcnow()
    stuck = [j.id for j in jobs.values() if j.status == JobStatus.running and j.lease_expires_at < now]
    assert not stuck, f"running with an expired lease: {stuck}"
    keys = storage.list_keys("jobs/")
    present = set(keys)
    for job in jobs.values():
        if job.status == JobStatus.succeeded:
            missing = [k for k in job.results.values() if k not in present]
            assert job.results and not missing, f"succeeded job {job.id} lacks {missing or 'results'}"
    orphans = []
    for key in keys:
        job_id = key.split("/")[1]
        job = jobs.get(job_id)
        if job is None or "/inputs/" not in key and job.status != JobStatus.running and key not in job.results.values():
            orphans.append(key)
    assert not orphans, f"orphan objects: {orphans}"
    return {"jobs": len(jobs), "objects": len(keys)}
