"""The API contract in-process (real database, broker and storage of each stack; no worker needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.service.conftest import migrate_in_process, run_cli

PROBLEM = "application/problem+json"


def create_key(_stack, role: str) -> str:
    """A key made in-process (the CLI itself is exercised in test_roles)."""
    from api.core.db import session_scope
    from api.core.keys import create_key as make_key
    from api.core.models import Role

    with session_scope() as session:
        return make_key(session, name=f"test {role}", role=Role(role))[1]


def upload(files: dict[str, Path], **fields: str) -> dict:
    return {"files": [(m, (p.name, p.read_bytes(), "application/gzip")) for m, p in files.items()],
            "data": fields}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["title"] and body["detail"]
    return body


def test_submit_poll_and_list(app_client, stack, study):
    key = create_key(stack, "integrator")
    r = app_client.post("/api/v1/synthesize", headers=auth(key), **upload(study, targets="flair", steps="3", seed="5"))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/api/v1/jobs/{job_id}" and r.json()["status"] == "queued"
    job = app_client.get(f"/api/v1/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "queued" and job["queue_position"] == 0 and job["attempts"] == 0
    assert job["inputs"] == ["t1", "t2", "t1ce"] and job["targets"] == ["flair"]
    assert job["steps"] == 3 and job["seed"] == 5 and job["results"] == {} and job["error"] is None
    second = app_client.post("/api/v1/synthesize", headers=auth(key), **upload(study)).json()["id"]
    assert app_client.get(f"/api/v1/jobs/{second}", headers=auth(key)).json()["queue_position"] == 1

    page = app_client.get("/api/v1/jobs?limit=1", headers=auth(key)).json()
    assert [j["id"] for j in page["items"]] == [second] and page["next_cursor"]
    page2 = app_client.get(f"/api/v1/jobs?limit=1&cursor={page['next_cursor']}", headers=auth(key)).json()
    assert [j["id"] for j in page2["items"]] == [job_id] and page2["next_cursor"] is None
    assert app_client.get("/api/v1/jobs?status=succeeded", headers=auth(key)).json()["items"] == []


def test_roles(app_client, stack, study):
    from tests.service.conftest import create_key as cli_key

    alice, bob = cli_key(stack, "integrator"), create_key(stack, "integrator")
    radiologist, admin = create_key(stack, "radiologist"), create_key(stack, "admin")
    job_id = app_client.post("/api/v1/synthesize", headers=auth(alice), **upload(study)).json()["id"]
    url = f"/api/v1/jobs/{job_id}"

    assert_problem(app_client.get(url), 401, "unauthorized")
    assert app_client.get(url).headers["www-authenticate"].startswith("Bearer")
    assert_problem(app_client.get(url, headers=auth("msk_forged")), 401, "unauthorized")
    assert_problem(app_client.get(url, headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    assert_problem(app_client.get(url, headers=auth(bob)), 404, "job_not_found")  # no leak that it exists
    assert app_client.get("/api/v1/jobs", headers=auth(bob)).json()["items"] == []
    assert app_client.get(url, headers=auth(radiologist)).status_code == 200
    assert app_client.get(url, headers=auth(admin)).status_code == 200
    assert_problem(app_client.post("/api/v1/synthesize", headers=auth(radiologist), **upload(study)), 403, "forbidden")
    assert_problem(app_client.post(f"{url}/cancel", headers=auth(radiologist)), 403, "forbidden")
    assert_problem(app_client.post(f"{url}/cancel", headers=auth(bob)), 404, "job_not_found")
    assert app_client.post("/api/v1/synthesize", headers=auth(admin), **upload(study)).status_code == 202

    prefix = alice[:12]
    run_cli(stack, "keys", "revoke", prefix)
    assert_problem(app_client.get(url, headers=auth(alice)), 401, "unauthorized")
    assert "revoked" in run_cli(stack, "keys", "list")


def test_expired_key(app_client, stack):
    from datetime import timedelta

    from api.core.db import session_scope
    from api.core.keys import create_key as make_key
    from api.core.models import Role, utcnow

    with session_scope() as session:
        _, plain = make_key(session, name="old", role=Role.admin, expires_at=utcnow() - timedelta(seconds=1))
    body = assert_problem(app_client.get("/api/v1/jobs", headers=auth(plain)), 401, "unauthorized")
    assert "expired" in body["detail"]


def test_keys_are_stored_hashed(app_client, stack):
    from sqlalchemy import select

    from api.core.db import session_scope
    from api.core.models import ApiKey

    key = create_key(stack, "admin")
    with session_scope() as session:
        stored = session.execute(select(ApiKey.key_hash, ApiKey.prefix)).all()
    assert all(key not in (h, p) for h, p in stored) and any(key.startswith(p) for _, p in stored)


def test_idempotent_replay(app_client, stack, study, tmp_path):
    key = create_key(stack, "integrator")
    headers = {**auth(key), "Idempotency-Key": "study-42"}
    first = app_client.post("/api/v1/synthesize", headers=headers, **upload(study, targets="flair"))
    again = app_client.post("/api/v1/synthesize", headers=headers, **upload(study, targets="flair"))
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert len(app_client.get("/api/v1/jobs", headers=auth(key)).json()["items"]) == 1
    assert_problem(app_client.post("/api/v1/synthesize", headers=headers, **upload(study, targets="flair", seed="9")),
                   422, "idempotency_key_reused")
    # another key may use the same Idempotency-Key for its own request
    other = create_key(stack, "integrator")
    assert app_client.post("/api/v1/synthesize", headers={**auth(other), "Idempotency-Key": "study-42"},
                           **upload(study)).json()["id"] != first.json()["id"]


@pytest.mark.parametrize(("fields", "code"), [
    ({"targets": "dwi"}, "unknown_target"),
    ({"targets": "t1"}, "target_supplied"),
    ({"formats": "analyze"}, "unsupported_format"),
    ({"steps": "0"}, "invalid_option"),
    ({"steps": "ten"}, "invalid_option"),
    ({"samples": "999"}, "invalid_option"),
    ({"colour": "blue"}, "unknown_field"),
])
def test_bad_options(app_client, stack, study, fields, code):
    key = create_key(stack, "integrator")
    assert_problem(app_client.post("/api/v1/synthesize", headers=auth(key), **upload(study, **fields)), 422, code)


def test_bad_files(app_client, stack, study, tmp_path):
    key = create_key(stack, "integrator")
    post = lambda **kw: app_client.post("/api/v1/synthesize", headers=auth(key), **kw)  # noqa: E731
    assert_problem(post(data={"targets": "flair"}), 422, "no_inputs")
    assert_problem(post(files=[("dwi", ("x.nii.gz", study["t1"].read_bytes()))]), 422, "unknown_modality")
    assert_problem(post(files=[("t1", ("x.nii.gz", b""))]), 422, "empty_file")
    assert_problem(post(files=[("t1", ("x.nii.gz", b"\x1f\x8bnot really gzip"))]), 422, "invalid_nifti")
    assert_problem(post(files=[("t1", ("x.nii", b"hello" * 100))]), 422, "invalid_nifti")
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), four_d)
    assert_problem(post(files=[("t1", ("4d.nii.gz", four_d.read_bytes()))]), 422, "not_3d")
    other_grid = tmp_path / "other.nii.gz"  # another grid is resampled by the worker, but not another space
    elsewhere = np.eye(4)
    elsewhere[:3, 3] = 400
    nib.save(nib.Nifti1Image(np.ones((20, 24, 12), np.float32), elsewhere), other_grid)
    assert_problem(post(files=[("t1", ("a", study["t1"].read_bytes())), ("t2", ("b", other_grid.read_bytes()))]),
                   422, "grid_mismatch")
    # nothing half-made: no job rows, no stored objects
    assert app_client.get("/api/v1/jobs", headers=auth(key)).json()["items"] == []
    from api.core.storage import get_storage

    assert get_storage().list_keys("jobs/") == []


def test_upload_limit(stack, study, monkeypatch):
    from fastapi.testclient import TestClient

    from tests.service.conftest import clear_caches

    migrate_in_process(stack, monkeypatch)
    key = create_key(stack, "integrator")
    monkeypatch.setenv("MSGLDM_API__MAX_UPLOAD_BYTES", "20000")
    clear_caches()
    from api.main import create_app

    with TestClient(create_app()) as client:
        r = client.post("/api/v1/synthesize", headers=auth(key), **upload(study))
        assert_problem(r, 413, "upload_too_large")
        assert client.get("/api/v1/jobs", headers=auth(key)).json()["items"] == []
    clear_caches()


def test_cancel_and_retry_queued(app_client, stack, study):
    key = create_key(stack, "integrator")
    job_id = app_client.post("/api/v1/synthesize", headers=auth(key), **upload(study)).json()["id"]
    r = app_client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert_problem(app_client.post(f"/api/v1/jobs/{job_id}/cancel", headers=auth(key)), 409, "invalid_state")
    r = app_client.post(f"/api/v1/jobs/{job_id}/retry", headers=auth(key))
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["finished_at"] is None
    assert_problem(app_client.post(f"/api/v1/jobs/{job_id}/retry", headers=auth(key)), 409, "invalid_state")


def test_results_of_unfinished_job(app_client, stack, study):
    key = create_key(stack, "integrator")
    job_id = app_client.post("/api/v1/synthesize", headers=auth(key), **upload(study)).json()["id"]
    body = assert_problem(app_client.get(f"/api/v1/jobs/{job_id}/results/flair.nii.gz", headers=auth(key)),
                          404, "result_not_found")
    assert "queued" in body["detail"]


def test_health_metrics_and_openapi(app_client, stack):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"]  # no worker in this test
    checks = ready.json()["checks"]
    assert checks["database"] == checks["broker"] == checks["storage"] == "ok"
    assert checks["worker"] == "no worker heartbeat"
    metrics = app_client.get("/metrics").text
    assert 'msgldm_jobs{status="queued"}' in metrics and "msgldm_http_requests_total" in metrics
    spec = app_client.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/synthesize"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"t1", "t2", "t1ce", "flair", "targets", "steps", "seed"} <= set(body["schema"]["properties"])
    assert spec["components"]["schemas"]["JobPublic"]["examples"]


def test_dependencies_down_are_503_with_retry_after(stack, study, monkeypatch):
    """A dead object store, broker or database is a 503 with Retry-After; nothing is half-created."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.service.conftest import clear_caches, free_port

    migrate_in_process(stack, monkeypatch)
    key = create_key(stack, "integrator")
    dead = f"127.0.0.1:{free_port()}"
    cases = {
        "storage_unavailable": {"MSGLDM_STORAGE__BACKEND": "s3", "MSGLDM_STORAGE__ENDPOINT": dead},
        "broker_unavailable": {"MSGLDM_BROKER__URL": f"redis://{dead}/0"},
    }
    for code, env in cases.items():
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        clear_caches()
        with TestClient(create_app()) as client:
            body = assert_problem(client.post("/api/v1/synthesize", headers=auth(key), **upload(study)), 503, code)
            assert body["type"] == f"/problems/{code}"
        for name in env:
            if name in stack.env:
                monkeypatch.setenv(name, stack.env[name])
            else:
                monkeypatch.delenv(name)
        clear_caches()
        with TestClient(create_app()) as client:  # nothing was left behind by the failed submission
            assert client.get("/api/v1/jobs", headers=auth(key)).json()["items"] == []
    from api.core.storage import get_storage

    assert get_storage().list_keys("jobs/") == []
    monkeypatch.setenv("MSGLDM_DATABASE__URL", f"postgresql+psycopg://postgres@{dead}/x")
    clear_caches()
    with TestClient(create_app()) as client:
        r = client.get("/api/v1/jobs", headers=auth(key))
        assert_problem(r, 503, "database_unavailable")
        assert r.headers["retry-after"]
    clear_caches()
