"""What the web UI needs from the API: the static UI itself, stored inputs for the viewer, validation mode."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.service.test_api import assert_problem, auth, create_key, upload


def test_ui_is_served_without_a_key(app_client, stack):
    r = app_client.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    page = app_client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="js/app.js"' in page.text
    script = app_client.get("/ui/js/viewer.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert app_client.get("/ui/js/missing.js").status_code == 404


def test_the_niivue_bundle_is_served_as_recorded(app_client, stack):
    """The viewer's NiiVue bundle (npm ci by `make install`) is served from the service, with the recorded hash."""
    vendor = Path(__file__).resolve().parents[2] / "api" / "ui" / "vendor"
    if not (vendor / "niivue.js").is_file():
        pytest.skip("api/ui/vendor/niivue.js is not installed (make install runs npm ci for it)")
    r = app_client.get("/ui/vendor/niivue.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert hashlib.sha256(r.content).hexdigest() == (vendor / "niivue.sha256").read_text().strip()
    assert "export {" in r.text[-3000:]  # the ES module the viewer imports (dist/index.js)


def test_inputs_are_downloadable_with_the_results_visibility(app_client, stack, study):
    owner = create_key(stack, "integrator")
    job_id = app_client.post("/api/v1/synthesize", headers=auth(owner), **upload(study, targets="flair")).json()["id"]
    r = app_client.get(f"/api/v1/jobs/{job_id}/inputs/t1ce", headers=auth(owner))
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert r.content == study["t1ce"].read_bytes()
    assert r.headers["content-disposition"] == f'attachment; filename="{job_id[:8]}-input-t1ce.nii.gz"'
    assert app_client.get(f"/api/v1/jobs/{job_id}/inputs/t1", headers=auth(create_key(stack, "radiologist"))
                          ).content == study["t1"].read_bytes()
    assert_problem(app_client.get(f"/api/v1/jobs/{job_id}/inputs/flair", headers=auth(owner)), 404, "input_not_found")
    assert_problem(app_client.get(f"/api/v1/jobs/{job_id}/inputs/t1", headers=auth(create_key(stack, "integrator"))),
                   404, "job_not_found")
    assert_problem(app_client.get(f"/api/v1/jobs/{job_id}/inputs/t1"), 401, "unauthorized")


def test_validation_mode_keeps_the_reference_as_an_input(app_client, stack, study, tmp_path):
    key = create_key(stack, "integrator")
    with_flair = {**study, "flair": study["t2"]}  # any volume on the grid will do as the reference here
    r = app_client.post("/api/v1/synthesize", headers=auth(key),
                        **upload(with_flair, targets="flair", reference="true"))
    assert r.status_code == 202, r.text
    job = app_client.get(f"/api/v1/jobs/{r.json()['id']}", headers=auth(key)).json()
    assert job["targets"] == ["flair"] and set(job["inputs"]) == {"t1", "t1ce", "t2", "flair"}
    assert app_client.get(f"/api/v1/jobs/{job['id']}/inputs/flair", headers=auth(key)).status_code == 200


@pytest.mark.parametrize(("files", "fields", "code"), [
    (("t1", "t2", "flair"), {"reference": "true"}, "reference_missing"),  # targets must be named
    (("t1", "t2"), {"reference": "true", "targets": "flair"}, "reference_missing"),  # the target was not uploaded
    (("flair",), {"reference": "true", "targets": "flair"}, "no_inputs"),  # nothing left to synthesize from
    (("t1", "flair"), {"targets": "flair"}, "target_supplied"),  # without reference=true, as before
])
def test_validation_mode_errors(app_client, stack, study, files, fields, code):
    key = create_key(stack, "integrator")
    chosen = {m: study.get(m, study["t2"]) for m in files}
    assert_problem(app_client.post("/api/v1/synthesize", headers=auth(key), **upload(chosen, **fields)), 422, code)
