"""Security: every endpoint x every role x no/malformed/forged/expired/revoked key answers exactly as designed,
and an integrator never sees another integrator's jobs (in-process, both stacks)."""

from __future__ import annotations

import io
import secrets
from datetime import timedelta

from tests.service.test_api import auth, create_key, upload

PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json"),
          ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"),
          ("GET", "/")}  # a redirect to the web UI (/ui/, static files; its data calls need a key)
BAD_CREDENTIALS = ("none", "malformed", "forged", "stored hash", "expired", "revoked")
ROLES = ("owner", "other integrator", "radiologist", "admin")
# (method, path) -> expected status per role, on a job owned by "owner" that has succeeded with one result.
# cancel/retry of a succeeded job: 409 once authorised (the state machine answers, not the authz layer).
ADMIN_ONLY = {"owner": 403, "other integrator": 403, "radiologist": 403}
MATRIX: dict[tuple[str, str], dict[str, int]] = {
    ("POST", "/api/v1/synthesize"): {"owner": 202, "other integrator": 202, "radiologist": 403, "admin": 202},
    ("GET", "/api/v1/jobs"): {"owner": 200, "other integrator": 200, "radiologist": 200, "admin": 200},
    ("GET", "/api/v1/jobs/{job_id}"): {"owner": 200, "other integrator": 404, "radiologist": 200, "admin": 200},
    ("GET", "/api/v1/jobs/{job_id}/results/{name}"): {"owner": 200, "other integrator": 404, "radiologist": 200,
                                                      "admin": 200},
    ("GET", "/api/v1/jobs/{job_id}/inputs/{modality}"): {"owner": 200, "other integrator": 404, "radiologist": 200,
                                                         "admin": 200},
    ("POST", "/api/v1/jobs/{job_id}/cancel"): {"owner": 409, "other integrator": 404, "radiologist": 403,
                                               "admin": 409},
    ("POST", "/api/v1/jobs/{job_id}/retry"): {"owner": 409, "other integrator": 404, "radiologist": 403,
                                              "admin": 409},
    ("GET", "/api/v1/admin/audit"): {"owner": 403, "other integrator": 403, "radiologist": 403, "admin": 200},
    ("GET", "/api/v1/models"): {"owner": 200, "other integrator": 200, "radiologist": 200, "admin": 200},
    # admin only; bodiless calls reach validation (422) or a missing run/version (404) only as an admin
    ("POST", "/api/v1/admin/training-runs"): ADMIN_ONLY | {"admin": 422},
    ("GET", "/api/v1/admin/training-runs"): ADMIN_ONLY | {"admin": 200},
    ("GET", "/api/v1/admin/training-runs/{run_id}"): ADMIN_ONLY | {"admin": 404},
    ("POST", "/api/v1/admin/training-runs/{run_id}/cancel"): ADMIN_ONLY | {"admin": 404},
    ("POST", "/api/v1/admin/datasets/validate"): ADMIN_ONLY | {"admin": 422},
    ("POST", "/api/v1/admin/models/{version}/promote"): ADMIN_ONLY | {"admin": 404},
    ("POST", "/api/v1/admin/models/{version}/rollback"): ADMIN_ONLY | {"admin": 404},
    # the owner's job exists but no DICOM node is configured here: 422 unknown_node (docs/pacs.md)
    ("POST", "/api/v1/admin/jobs/{job_id}/deliveries/{node}"): ADMIN_ONLY | {"admin": 422},
}


def _routes(app) -> set[tuple[str, str]]:
    """Every route: the OpenAPI paths (the included routers) and the docs routes of the app itself."""
    out = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    out |= {(m, r.path) for r in app.routes for m in getattr(r, "methods", None) or () if m != "HEAD"}
    return out


def _keys(stack) -> dict[str, str]:
    from api.core.db import session_scope
    from api.core.keys import create_key as make_key
    from api.core.models import Role, utcnow

    keys = {role: create_key(stack, r) for role, r in (("owner", "integrator"), ("other integrator", "integrator"),
                                                        ("radiologist", "radiologist"), ("admin", "admin"))}
    with session_scope() as session:
        keys["expired"] = make_key(session, name="old", role=Role.admin, expires_at=utcnow() - timedelta(seconds=1))[1]
        row, keys["revoked"] = make_key(session, name="gone", role=Role.admin)
        row.revoked_at = utcnow()
        session.commit()
        from api.core.keys import hash_key

        keys["stored hash"] = hash_key(keys["admin"])  # what a database leak would expose: useless as a key
    keys["forged"] = "msk_" + secrets.token_urlsafe(32)
    return keys


def _succeeded_job(owner_key: str, client, study) -> str:
    """A job of the owner, finished with one result object (the worker is not under test here)."""
    from api.core.db import session_scope
    from api.core.models import Job, JobStatus, utcnow
    from api.core.storage import get_storage

    job_id = client.post("/api/v1/synthesize", headers=auth(owner_key), **upload(study)).json()["id"]
    get_storage().put_stream(f"jobs/{job_id}/attempt-1/flair.nii.gz", io.BytesIO(b"result"), 6)
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.finished_at = JobStatus.succeeded, utcnow()
        job.results = {"flair.nii.gz": f"jobs/{job_id}/attempt-1/flair.nii.gz"}
    return job_id


def test_endpoint_role_credential_matrix(app_client, stack, study):
    from api.main import create_app

    routes = _routes(create_app())
    assert routes - PUBLIC == set(MATRIX), "a new endpoint needs its row in MATRIX (and a decision on who may call)"
    keys = _keys(stack)
    job_id = _succeeded_job(keys["owner"], app_client, study)

    def call(method: str, path: str, headers: dict[str, str]):
        url = path.replace("{job_id}", job_id).replace("{name}", "flair.nii.gz").replace("{modality}", "t1")
        if method == "POST" and path.endswith("/synthesize"):
            return app_client.post(url, headers=headers, **upload(study))
        return app_client.request(method, url, headers=headers)

    seen: dict[tuple[str, str, str], int] = {}
    for (method, path), expected in MATRIX.items():
        for credential in BAD_CREDENTIALS:
            headers = {} if credential == "none" else \
                {"Authorization": "Basic b3duZXI6cHc="} if credential == "malformed" else auth(keys[credential])
            r = call(method, path, headers)
            seen[(method, path, credential)] = r.status_code
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", (method, path, credential, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
        for role in ROLES:
            r = call(method, path, auth(keys[role]))
            seen[(method, path, role)] = r.status_code
            assert r.status_code == expected[role], (method, path, role, r.text)
            if r.status_code >= 400:
                assert r.headers["content-type"].startswith("application/problem+json")
    for method, path in PUBLIC - {("GET", "/docs/oauth2-redirect")}:
        assert app_client.request(method, path).status_code in (200, 503), path  # /readyz: 503 without a worker
    assert len(seen) == len(MATRIX) * (len(BAD_CREDENTIALS) + len(ROLES))


def test_integrators_never_see_each_others_jobs(app_client, stack, study):
    alice, bob = create_key(stack, "integrator"), create_key(stack, "integrator")
    mine = {app_client.post("/api/v1/synthesize", headers=auth(alice), **upload(study)).json()["id"] for _ in "ab"}
    theirs = app_client.post("/api/v1/synthesize", headers=auth(bob), **upload(study)).json()["id"]
    for status in (None, "queued"):
        params = {"limit": 1} | ({"status": status} if status else {})
        ids, cursor = set(), None
        while True:
            page = app_client.get("/api/v1/jobs", params=params | ({"cursor": cursor} if cursor else {}),
                                  headers=auth(alice)).json()
            ids |= {j["id"] for j in page["items"]}
            if not (cursor := page["next_cursor"]):
                break
        assert ids == mine
    # a cursor built from bob's job does not open bob's page either
    import base64
    import json

    from api.core.db import session_scope
    from api.core.models import Job

    with session_scope() as session:
        created = session.get(Job, theirs).created_at
    forged = base64.urlsafe_b64encode(json.dumps([(created + timedelta(seconds=1)).isoformat(), theirs]).encode())
    page = app_client.get("/api/v1/jobs", params={"cursor": forged.decode()}, headers=auth(alice)).json()
    assert theirs not in {j["id"] for j in page["items"]}
    for suffix in ("", "/results/record.json"):
        assert app_client.get(f"/api/v1/jobs/{theirs}{suffix}", headers=auth(alice)).json()["code"] == "job_not_found"
    assert app_client.post(f"/api/v1/jobs/{theirs}/cancel", headers=auth(alice)).status_code == 404
