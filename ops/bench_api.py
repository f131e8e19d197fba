"""``make bench-api``: one uvicorn process under load: job status, study submission, a long queue, API memory.

    python ops/bench_api.py [--stack embedded|pg] [--duration 10] [--connections 16] [--submissions 20]
        [--queued 1000] [--out var/bench]

1. a throwaway stack: ``embedded`` (SQLite database and broker, local object storage: what ``make run`` serves)
   or ``pg`` (a fresh database on the PostgreSQL at 127.0.0.1, Redis database ``--redis-db`` as the broker,
   local object storage); migrated, one integrator key; the API under uvicorn exactly as the Dockerfile runs it
   (one process, access log on). No worker runs, so every job stays queued.
2. **status**: one queued job, ``wrk`` with ``--connections`` connections for ``--duration`` s on
   ``GET /api/v1/jobs/{id}``: requests/s and the latency percentiles;
3. **submission**: ``--submissions`` sequential ``POST /api/v1/synthesize`` of the shared BraTS case's four
   files (T1, T1CE, T2, FLAIR; the serving config names a fifth modality, PD, as the target, so that all four
   files are inputs): p50/p95/max latency, every answer must be 202. The API process' peak RSS (reset before, read
   after, from /proc) against the study's size shows whether uploads are copied whole into memory;
4. **long queue**: queued job rows added up to ``--queued``; ``wrk`` again on the newest job (the one whose
   queue position counts every other job).

Each wrk run also records the CPU time per request of the API process, the PostgreSQL and Redis servers and wrk
(from /proc): which process bounds the throughput.

Writes ``OUT/api.json`` and prints a table with the targets (>= 500 requests/s and p99 < 50 ms at 16
connections; submission p95 < 1 s; status with the long queue within 20 % of the empty-queue figure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess  # nosec B404 - fixed argv, no shell
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BRATS = ROOT.parent / "shared" / "data" / "brats2023_gli_00001_000"
FILES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGETS = {"status_rps": 500, "status_p99_ms": 50, "submit_p95_s": 1.0, "queue_slowdown": 0.20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "api.cli", *args],  # nosec B603 - fixed argv
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    if out.returncode:
        raise SystemExit(f"api.cli {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def bench_checkpoint(dest: Path) -> Path:
    """A serving config (all the API reads of a model) with PD added, so the four BraTS files are all inputs."""
    config = json.loads((ROOT / "model" / "default" / "config.json").read_text())
    config["modalities"] = [*config["modalities"], "pd"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def make_stack(kind: str, tmp: Path, redis_db: int) -> tuple[dict[str, str], list]:
    env = {
        "MSGLDM_STORAGE__BACKEND": "local",
        "MSGLDM_STORAGE__LOCAL_ROOT": str(tmp / "objects"),
        "MSGLDM_INFERENCE__CHECKPOINT": str(bench_checkpoint(tmp / "serving")),
        "MSGLDM_LOG_LEVEL": "WARNING",
        # admission control stays on (its per-request counter is part of the cost measured) but never refuses: one
        # key polls far beyond a client's rate here, and the long-queue run holds more jobs than a key may have
        "MSGLDM_API__RATE_LIMIT_PER_MINUTE": str(10**9),
        "MSGLDM_API__SUBMIT_RATE_LIMIT_PER_MINUTE": str(10**9),
        "MSGLDM_API__MAX_QUEUED_JOBS": str(10**9),
        "MSGLDM_API__MAX_ACTIVE_JOBS_PER_KEY": str(10**9),
    }
    cleanup: list = []
    if kind == "embedded":
        env |= {"MSGLDM_DATABASE__URL": f"sqlite:///{tmp / 'msgldm.db'}",
                "MSGLDM_BROKER__URL": f"sqla+sqlite:///{tmp / 'broker.db'}"}
        return env, cleanup
    import redis
    from sqlalchemy import create_engine, text

    name = f"msgldm_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    cleanup.append(drop)
    broker = f"redis://127.0.0.1:6379/{redis_db}"
    redis.Redis.from_url(broker).flushdb()  # this benchmark's own database number
    cleanup.append(lambda: redis.Redis.from_url(broker).flushdb())
    env |= {"MSGLDM_DATABASE__URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
            "MSGLDM_BROKER__URL": broker}
    return env, cleanup


# ----------------------------------------------------------------------------------------------- measuring


CPU_GROUPS = ("postgres", "redis-server")  # by process name; the API process by its pid, wrk as our child


def cpu_seconds(api_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the API process, all PostgreSQL and Redis server processes on
    this machine, and this script's finished children (wrk), from /proc: where a request's CPU goes."""
    tick = os.sysconf("SC_CLK_TCK")
    used = dict.fromkeys(("api", *CPU_GROUPS), 0.0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        group = "api" if int(stat.parent.name) == api_pid else name if name in CPU_GROUPS else None
        if group is not None:
            used[group] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    children = os.times()
    used["wrk"] = children.children_user + children.children_system
    return used


def wrk(url: str, key: str, connections: int, duration: float, api_pid: int) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (Debian), then run again")
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--latency", "--timeout",
           "5s", "-H", f"Authorization: Bearer {key}", url]
    before, start = cpu_seconds(api_pid), time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout  # nosec B603
    wall, after = time.monotonic() - start, cpu_seconds(api_pid)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {m.group(1): _ms(m.group(2), m.group(3)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\b",
                                                                         out, re.M)}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = {name: round((after[name] - before[name]) / max(total, 1) * 1e3, 3) for name in after}
    busy = sum(after[name] - before[name] for name in after) / (wall * (os.cpu_count() or 1))
    return {"cpu_ms_per_request": cpu, "cpu_busy_share": round(busy, 3),
            "requests_per_s": rps, "p50_ms": pct["50"], "p75_ms": pct["75"], "p90_ms": pct["90"],
            "p99_ms": pct["99"], "requests": total, "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(0) if errors else None, "connections": connections,
            "duration_s": duration, "command": " ".join(cmd[:-3] + ["'Authorization: Bearer ...'", url])}


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def proc_memory_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def submit(client: httpx.Client, files: dict[str, Path]) -> tuple[float, int, str]:
    handles = {m: open(p, "rb") for m, p in files.items()}  # noqa: SIM115 - closed below; httpx streams them
    try:
        start = time.perf_counter()
        r = client.post("/api/v1/synthesize", files={m: (p.name, handles[m], "application/gzip")
                                                     for m, p in files.items()}, data={"targets": "pd"})
        elapsed = time.perf_counter() - start
    finally:
        for f in handles.values():
            f.close()
    return elapsed, r.status_code, r.json().get("id", r.text)


def fill_queue(env: dict[str, str], template_id: str, total: int) -> int:
    """Add queued job rows (copies of one submitted job, same inputs) until ``total`` jobs are queued."""
    os.environ.update(env)
    from sqlalchemy import func, select

    from api.core import settings
    from api.core.db import get_engine, get_sessionmaker, session_scope
    from api.core.models import Job, JobStatus, new_id

    for fn in (settings.get_settings, get_engine, get_sessionmaker):
        fn.cache_clear()
    with session_scope() as session:
        job = session.get(Job, template_id)
        queued = session.execute(select(func.count()).select_from(Job).where(Job.status == JobStatus.queued)).scalar()
        for _ in range(total - queued - 1):  # and the newest below
            session.add(Job(id=new_id(), owner_id=job.owner_id, request_hash=job.request_hash, inputs=job.inputs,
                            targets=job.targets, formats=job.formats, steps=job.steps, seed=job.seed,
                            samples=job.samples))
        session.flush()
        newest = new_id()
        session.add(Job(id=newest, owner_id=job.owner_id, request_hash=job.request_hash, inputs=job.inputs,
                        targets=job.targets, formats=job.formats, steps=job.steps, seed=job.seed, samples=1))
    get_engine().dispose()
    return newest  # type: ignore[return-value]


def queue_position_seconds(job_id: str, repeats: int = 200) -> float:
    """Median time of the queue-position query for one job, in this process (after fill_queue set the env)."""
    from api.core.db import get_engine, session_scope
    from api.core.jobs import queue_position
    from api.core.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            queue_position(session, job)
            times.append(time.perf_counter() - start)
    get_engine().dispose()
    return statistics.median(times)


def oldest_queued(env: dict[str, str]) -> str:
    from sqlalchemy import select

    from api.core.db import session_scope
    from api.core.models import Job, JobStatus

    with session_scope() as session:
        return session.execute(select(Job.id).where(Job.status == JobStatus.queued)
                               .order_by(Job.created_at).limit(1)).scalar_one()


# ----------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    if not BRATS.is_dir():
        raise SystemExit(f"the shared BraTS case is not at {BRATS}")
    files = {m: BRATS / f"BraTS-GLI-00001-000-{s}.nii.gz" for m, s in FILES.items()}
    study_mb = sum(p.stat().st_size for p in files.values()) / 2**20
    tmp = Path(tempfile.mkdtemp(prefix="msgldm-bench-api-"))
    env, cleanup = make_stack(args.stack, tmp, args.redis_db)
    full_env = {**os.environ, **env}
    api = None
    try:
        cli(full_env, "migrate")
        key = cli(full_env, "keys", "create", "--name", "bench", "--role", "integrator").strip().splitlines()[-1]
        port = free_port()
        log = open(tmp / "uvicorn.log", "wb")  # noqa: SIM115 - closed with the process
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",  # nosec B603
                                "--port",
                                str(port), "--proxy-headers"], cwd=ROOT, env=full_env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise SystemExit(f"uvicorn did not start:\n{(tmp / 'uvicorn.log').read_text()[-3000:]}")
            time.sleep(0.3)
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        rss_idle = proc_memory_mb(api.pid, "VmRSS")

        # 2. status of the only queued job
        _, code, first = submit(client, files)
        if code != 202:
            raise SystemExit(f"submission answered {code}: {first}")
        print(f"status, 1 queued job: wrk {args.connections} connections, {args.duration} s", flush=True)
        load_status = os.getloadavg()
        empty = wrk(f"{base}/api/v1/jobs/{first}", key, args.connections, args.duration, api.pid)

        # 3. submissions
        print(f"{args.submissions} submissions of the four-file study ({study_mb:.1f} MB)", flush=True)
        reset = reset_peak_rss(api.pid)
        rss_before = proc_memory_mb(api.pid, "VmRSS")
        latencies, codes = [], []
        load_submit = os.getloadavg()
        for _ in range(args.submissions):
            elapsed, code, _ = submit(client, files)
            latencies.append(elapsed)
            codes.append(code)
        rss_peak = proc_memory_mb(api.pid, "VmHWM")
        lat = sorted(latencies)
        submission = {
            "count": len(lat), "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "max_s": lat[-1], "status_codes": sorted(set(codes)), "study_mb": round(study_mb, 2),
            "files": [p.name for p in files.values()],
        }
        memory = {"rss_idle_mb": rss_idle, "rss_before_submissions_mb": rss_before,
                  "rss_peak_during_submissions_mb": rss_peak if reset else None,
                  "peak_growth_mb": round(rss_peak - rss_before, 1) if reset else None, "study_mb": round(study_mb, 2),
                  "peak_reset": reset}

        # 4. long queue
        newest = fill_queue(env, first, args.queued)
        position = client.get(f"/api/v1/jobs/{newest}").json()["queue_position"]
        print(f"status, {position + 1} queued jobs (newest job, position {position})", flush=True)
        load_queue = os.getloadavg()
        full = wrk(f"{base}/api/v1/jobs/{newest}", key, args.connections, args.duration, api.pid)
        # the same queue, alternately the oldest job (position 0: nothing to count) and the newest (counts all):
        # what the queue position itself costs, with the machine's load drift averaged out
        oldest = oldest_queued(env)
        alternating: dict[str, list[dict]] = {"oldest": [], "newest": []}
        for _ in range(args.alternations):
            for name, job_id in (("oldest", oldest), ("newest", newest)):
                alternating[name].append(
                    wrk(f"{base}/api/v1/jobs/{job_id}", key, args.connections, args.duration, api.pid))
        query = {"oldest_s": queue_position_seconds(oldest), "newest_s": queue_position_seconds(newest)}
        client.close()
    finally:
        if api is not None and api.poll() is None:
            api.send_signal(signal.SIGTERM)
            try:
                api.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(api.pid, signal.SIGKILL)
                api.wait()
        for fn in cleanup:
            fn()
        shutil.rmtree(tmp, ignore_errors=True)

    slowdown = full["p50_ms"] / empty["p50_ms"] - 1
    return {
        "stack": args.stack, "server": "uvicorn api.main:app (1 process, --proxy-headers, access log on)",
        "status_empty_queue": {**empty, "loadavg": [round(v, 2) for v in load_status]},
        "status_long_queue": {**full, "queued_jobs": position + 1, "loadavg": [round(v, 2) for v in load_queue]},
        "queue_slowdown_p50": round(slowdown, 4),
        "queue_slowdown_rps": round(1 - full["requests_per_s"] / empty["requests_per_s"], 4),
        "queue_alternating": {name: {"p50_ms": [r["p50_ms"] for r in runs], "p99_ms": [r["p99_ms"] for r in runs],
                                     "requests_per_s": [r["requests_per_s"] for r in runs]}
                              for name, runs in alternating.items()},
        "queue_position_query_s": query,
        "submission": {**submission, "loadavg": [round(v, 2) for v in load_submit]},
        "memory": memory,
        "targets": TARGETS,
        "met": {
            "status_rps": empty["requests_per_s"] >= TARGETS["status_rps"],
            "status_p99": empty["p99_ms"] < TARGETS["status_p99_ms"],
            "submit_p95": submission["p95_s"] < TARGETS["submit_p95_s"] and codes and set(codes) == {202},
            "long_queue": slowdown <= TARGETS["queue_slowdown"],
        },
        "host": {"cores": os.cpu_count(), "loadavg_end": [round(v, 2) for v in os.getloadavg()]},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def table(r: dict) -> str:
    e, f, s, m = r["status_empty_queue"], r["status_long_queue"], r["submission"], r["memory"]
    rows = [
        ("GET /api/v1/jobs/{id}, 1 queued job", f"{e['requests_per_s']:.0f} req/s, p50 {e['p50_ms']:.1f} ms, "
         f"p99 {e['p99_ms']:.1f} ms", ">= 500 req/s, p99 < 50 ms", r["met"]["status_rps"] and r["met"]["status_p99"]),
        (f"GET /api/v1/jobs/{{id}}, {f['queued_jobs']} queued jobs", f"{f['requests_per_s']:.0f} req/s, p50 "
         f"{f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms ({r['queue_slowdown_p50']:+.0%} p50)",
         "within 20 % of the above", r["met"]["long_queue"]),
        (f"POST /api/v1/synthesize, 4 files {s['study_mb']} MB", f"p50 {s['p50_s']:.3f} s, p95 {s['p95_s']:.3f} s, "
         f"max {s['max_s']:.3f} s, codes {s['status_codes']}", "202, p95 < 1 s", r["met"]["submit_p95"]),
        ("API RSS peak growth while uploading", f"{m['peak_growth_mb']} MB (study {m['study_mb']} MB)",
         "no whole-study copies", None),
    ]
    alt, q = r["queue_alternating"], r["queue_position_query_s"]
    rows.append((f"same queue, alternately oldest / newest job ({len(alt['oldest']['p50_ms'])} pairs)",
                 f"p50 {alt['oldest']['p50_ms']} / {alt['newest']['p50_ms']} ms; req/s "
                 f"{[round(v) for v in alt['oldest']['requests_per_s']]} / "
                 f"{[round(v) for v in alt['newest']['requests_per_s']]}; queue-position query "
                 f"{q['oldest_s'] * 1e3:.2f} / {q['newest_s'] * 1e3:.2f} ms", "(diagnostic)", None))
    cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in e["cpu_ms_per_request"].items())
    rows.append(("CPU per status request, by process (1 queued job)", f"{cpu} ms; CPUs busy "
                 f"{e['cpu_busy_share']:.0%}", "(diagnostic)", None))
    lines = [f"stack: {r['stack']}; {r['server']}", "| what | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'-' if d is None else ('yes' if d else 'NO')} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python ops/bench_api.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stack", choices=("embedded", "pg"), default="embedded")
    p.add_argument("--redis-db", type=int, default=int(os.environ.get("MSGLDM_BENCH_REDIS_DB", "15")))
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each wrk run")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--submissions", type=int, default=20)
    p.add_argument("--queued", type=int, default=1000)
    p.add_argument("--alternations", type=int, default=2, help="oldest/newest wrk pairs on the long queue")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "bench")
    args = p.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"api-{args.stack}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
