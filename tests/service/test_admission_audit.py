"""Admission control (rate limit per key, queue depth) shared across API processes, and the append-only audit
log with its admin endpoint; on both stacks."""

from __future__ import annotations

import os
import sys
import time

import httpx
import pytest

from api.core.errors import ProblemError
from tests.service.conftest import clear_caches, free_port, migrate_in_process, start_process, stop_process
from tests.service.test_api import assert_problem, auth, create_key, upload


def _fresh_window(margin: float = 8.0) -> None:
    """Rate windows are whole minutes: start a counting test where the minute has room left."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.2)


def test_rate_limit_is_shared_by_api_processes(stack, monkeypatch, tmp_path):
    """Two uvicorn processes, one key, limit 6/min: the 7th request is 429 with Retry-After, whichever process
    answers; another key is not affected."""
    migrate_in_process(stack, monkeypatch)
    key, other = create_key(stack, "integrator"), create_key(stack, "integrator")
    env = {**os.environ, **stack.env, "MSGLDM_API__RATE_LIMIT_PER_MINUTE": "6"}
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = [free_port(), free_port()]
    procs = [start_process(f"api{i}", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
                                        "--port", str(p)], env, logs) for i, p in enumerate(ports)]
    try:
        for p in ports:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (logs / "api0.log").read_text()
                time.sleep(0.3)
        _fresh_window()
        codes = [httpx.get(f"http://127.0.0.1:{ports[i % 2]}/api/v1/jobs", headers=auth(key)).status_code
                 for i in range(6)]
        assert codes == [200] * 6
        r = httpx.get(f"http://127.0.0.1:{ports[0]}/api/v1/jobs", headers=auth(key))
        assert_problem(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert_problem(httpx.get(f"http://127.0.0.1:{ports[1]}/api/v1/jobs", headers=auth(key)), 429, "rate_limited")
        assert httpx.get(f"http://127.0.0.1:{ports[1]}/api/v1/jobs", headers=auth(other)).status_code == 200
    finally:
        for proc in procs:
            stop_process(proc)


def test_far_from_the_limit_hits_are_summed_in_the_process_and_sent_once_a_second(stack, monkeypatch):
    """The counter store (Redis, or the database's rate_counter) sees the first hit of a window, then nothing until
    a second has passed, then the sum; once the estimate reaches half the limit every hit goes to the store."""
    import uuid

    from sqlalchemy import select

    from api import admission
    from api.core.db import session_scope
    from api.core.models import RateCounter
    from api.core.settings import get_settings

    migrate_in_process(stack, monkeypatch)
    _fresh_window(margin=15)
    bucket, window = f"test:{uuid.uuid4().hex}", int(time.time() // admission.WINDOW)

    def stored() -> int:
        url = get_settings().broker.url
        if url.startswith("redis://"):
            value = admission._redis(url).get(f"msgldm:rate:{bucket}:{window}")
            return int(value or 0)
        with session_scope() as session:
            row = session.execute(select(RateCounter.count).where(RateCounter.bucket == bucket,
                                                                  RateCounter.window == window)).scalar_one_or_none()
            return int(row or 0)

    with session_scope() as session:
        for _ in range(40):
            admission.hit(session, bucket, 1000)
        assert stored() == 1  # the window's first hit only
        time.sleep(admission.SYNC_SECONDS + 0.1)
        admission.hit(session, bucket, 1000)
        assert stored() == 41  # the sum, in one round trip
        for _ in range(10):
            admission.hit(session, bucket, 100)  # 51 >= half of 100: from here on every hit is in the store
        assert stored() == 51
        for _ in range(49):
            admission.hit(session, bucket, 100)
        assert stored() == 100
        with pytest.raises(ProblemError) as err:
            admission.hit(session, bucket, 100)
        assert err.value.status == 429


def test_queue_depth_and_active_jobs_limits(stack, study, monkeypatch):
    """Per key: at most N active jobs (429); in total: at most M queued (503 queue_full); both with Retry-After
    and before the upload is read; a finished job frees its slot."""
    from fastapi.testclient import TestClient

    migrate_in_process(stack, monkeypatch)
    alice, bob = create_key(stack, "integrator"), create_key(stack, "integrator")
    monkeypatch.setenv("MSGLDM_API__MAX_ACTIVE_JOBS_PER_KEY", "1")
    monkeypatch.setenv("MSGLDM_API__MAX_QUEUED_JOBS", "2")
    clear_caches()
    from api.main import create_app

    with TestClient(create_app()) as client:
        first = client.post("/api/v1/synthesize", headers=auth(alice), **upload(study))
        assert first.status_code == 202
        r = client.post("/api/v1/synthesize", headers=auth(alice), **upload(study))
        assert_problem(r, 429, "too_many_active_jobs") and r.headers["retry-after"]
        assert client.post("/api/v1/synthesize", headers=auth(bob), **upload(study)).status_code == 202
        carol = create_key(stack, "integrator")
        r = client.post("/api/v1/synthesize", headers=auth(carol), **upload(study))
        assert_problem(r, 503, "queue_full") and r.headers["retry-after"]
        assert client.post(f"/api/v1/jobs/{first.json()['id']}/cancel", headers=auth(alice)).status_code == 200
        assert client.post("/api/v1/synthesize", headers=auth(alice), **upload(study)).status_code == 202
        assert len(client.get("/api/v1/jobs", headers=auth(alice)).json()["items"]) == 2
    clear_caches()


def test_audit_log(app_client, stack, study, capsys):
    """Every audited action leaves one row with actor, action and target; admins read it with filters and a
    cursor; other roles get 403; the table refuses UPDATE and DELETE."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from api.cli import main as cli
    from api.core.db import get_engine

    assert cli(["keys", "create", "--name", "gateway", "--role", "integrator"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    admin, radiologist = create_key(stack, "admin"), create_key(stack, "radiologist")
    job_id = app_client.post("/api/v1/synthesize", headers=auth(key), **upload(study, targets="flair")).json()["id"]
    assert app_client.get(f"/api/v1/jobs/{job_id}", headers=auth(radiologist)).status_code == 200
    assert app_client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth(key)).status_code == 200
    assert app_client.post(f"/api/v1/jobs/{job_id}/retry", headers=auth(key)).status_code == 202
    assert cli(["keys", "revoke", key[:12]]) == 0

    r = app_client.get("/api/v1/admin/audit", headers=auth(admin))
    assert r.status_code == 200, r.text
    events = r.json()["items"]
    assert [e["action"] for e in events] == ["key.revoke", "job.retry", "job.cancel", "job.view", "job.submit",
                                             "key.create"]
    submit = events[4]
    assert submit["target_type"] == "job" and submit["target_id"] == job_id and submit["actor_role"] == "integrator"
    assert submit["detail"] == {"inputs": ["t1", "t2", "t1ce"], "targets": ["flair"]}
    assert events[3]["actor_role"] == "radiologist"
    assert events[0]["actor_key_id"] is None and events[0]["actor_role"] == "operator"
    assert events[0]["target_id"] == events[5]["target_id"] == submit["actor_key_id"]

    page = app_client.get("/api/v1/admin/audit?limit=4", headers=auth(admin)).json()
    rest = app_client.get(f"/api/v1/admin/audit?limit=4&cursor={page['next_cursor']}", headers=auth(admin)).json()
    assert [e["id"] for e in page["items"] + rest["items"]] == [e["id"] for e in events] and not rest["next_cursor"]
    only = app_client.get(f"/api/v1/admin/audit?action=job.cancel&target_id={job_id}", headers=auth(admin)).json()
    assert [e["action"] for e in only["items"]] == ["job.cancel"]
    since = events[2]["at"]
    recent = app_client.get("/api/v1/admin/audit", params={"since": since}, headers=auth(admin)).json()["items"]
    assert {e["action"] for e in recent} >= {"key.revoke", "job.retry", "job.cancel"}
    assert_problem(app_client.get("/api/v1/admin/audit?cursor=x", headers=auth(admin)), 422, "invalid_cursor")
    assert_problem(app_client.get("/api/v1/admin/audit", headers=auth(radiologist)), 403, "forbidden")

    for statement in ("UPDATE audit_event SET action = 'x'", "DELETE FROM audit_event"):
        with pytest.raises(DBAPIError, match="append-only"), get_engine().begin() as conn:
            conn.execute(text(statement))
    with get_engine().connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_event")).scalar_one() == len(events)
