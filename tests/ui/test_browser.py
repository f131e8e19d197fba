"""The web UI in headless Chromium against real processes (uvicorn + a Celery worker on PostgreSQL, Redis and an
S3 server): sign in, watch a job appear and finish, open it, scroll slices, download a result; admin pages."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import brats_files, create_key
from tests.ui.conftest import screenshot

PIXELS = """s => {
  const c = document.querySelector(`canvas[data-series='${s}']`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let hash = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) { hash = (hash * 31 + d[i]) >>> 0; sum += d[i]; }
  return [c.width, c.height, hash, sum];
}"""
BANNER = "SYNTHETIC - not for primary diagnosis"


def sign_in(page, base: str, key: str) -> None:
    page.goto(f"{base}/")
    assert page.url.endswith("/ui/"), page.url  # / redirects to the UI
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def submit_validation_job(base: str, key: str) -> str:
    """T1, T1CE, T2 in; FLAIR synthesized with 2 samples (uncertainty) and scored against the uploaded FLAIR."""
    files = brats_files()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        r = client.post("/api/v1/synthesize", data={"targets": "flair", "reference": "true", "steps": "2",
                                                    "samples": "2", "seed": "7"},
                        files=[(m, (p.name, p.read_bytes(), "application/gzip")) for m, p in files.items()])
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_sign_in_follow_a_job_view_slices_and_download(ui_service, page, tmp_path: Path):
    reader = create_key(ui_service.stack, "radiologist")
    sign_in(page, ui_service.base, reader)
    page.get_by_text("No jobs match.").wait_for()

    # a job submitted elsewhere appears in the list and finishes there (live updates, no reload)
    job_id = submit_validation_job(ui_service.base, create_key(ui_service.stack, "integrator"))
    row = page.locator(f'tr[data-job="{job_id}"]')
    row.wait_for()
    assert row.get_by_role("progressbar").count() == 1
    page.locator(f'tr[data-job="{job_id}"][data-status="succeeded"]').wait_for(timeout=600_000)
    screenshot(page, "jobs")

    # the job page: banner, every series side by side, validation metrics from the worker's record
    row.get_by_role("link").click()
    page.wait_for_function("() => window.msgldmViewer !== undefined", timeout=120_000)
    assert BANNER in page.get_by_role("alert").first.inner_text()
    series = page.eval_on_selector_all("canvas", "cs => cs.map(c => c.dataset.series)")
    assert series == ["t1", "t2", "t1ce", "flair", "flair.uncertainty", "flair.reference", "flair.difference"]
    api = httpx.Client(base_url=ui_service.base, headers={"Authorization": f"Bearer {reader}"}, timeout=60)
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert {"preview.png", "report.html", "flair.uncertainty.nii.gz", "flair.reference.nii.gz"} <= set(job["results"])
    record = api.get(job["results"]["record.json"]).json()
    psnr = record["validation"]["metrics"]["flair"]["psnr"]
    assert f"{psnr:.2f}" in page.locator("#validation-metrics").inner_text()
    page.locator("#preview img").wait_for()

    # scroll: keyboard, then the mouse wheel; every panel follows the same slice and its pixels change
    before = {s: page.evaluate(PIXELS, s) for s in ("t1", "flair")}
    assert before["flair"][3] > 0, "the synthesized slice is black"
    label = page.locator("#slice-label")
    start = label.inner_text()
    page.locator(".viewer").focus()
    for _ in range(8):
        page.keyboard.press("ArrowUp")
    after = {s: page.evaluate(PIXELS, s) for s in ("t1", "flair")}
    assert label.inner_text() != start
    assert all(after[s][2] != before[s][2] for s in after), "a panel did not follow the slice change"
    page.locator("canvas[data-series='flair']").hover()
    for _ in range(3):
        page.mouse.wheel(0, 120)
    page.wait_for_function(f"() => window.msgldmViewer.slice === {int(start.split()[1]) - 1 + 8 + 3}")
    wheeled = page.evaluate(PIXELS, "flair")
    assert wheeled[2] != after["flair"][2]
    screenshot(page, "job")

    # window/level changes the rendering; the coronal plane has the volume's other shape
    page.get_by_label("Window").fill("40")
    assert page.evaluate(PIXELS, "flair")[2] != wheeled[2]
    page.get_by_role("button", name="Coronal").click()
    coronal = page.evaluate(PIXELS, "flair")
    shape = record["inputs"]["t1"]["shape"]  # BraTS voxel axes run along R, A, S (up to sign)
    assert coronal[:2] == [shape[0], shape[2]], (coronal, shape)

    # download a result: the browser receives the same bytes the API serves
    with page.expect_download() as info:
        page.locator('button[data-result="flair.nii.gz"]').click()
    download = info.value
    assert download.suggested_filename == f"{job_id[:8]}-flair.nii.gz"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.read_bytes() == api.get(job["results"]["flair.nii.gz"]).content

    # the admin pages say so when this server has no model registry (contract endpoints answer 404)
    page.goto(f"{ui_service.base}/ui/#/admin/models")
    if api.get("/api/v1/models").status_code == 404:
        assert "no model registry" in page.locator("#admin-unavailable").inner_text()
    else:
        page.locator("#models").wait_for()


def test_admin_promotes_a_version(ui_service, page):
    admin = create_key(ui_service.stack, "admin")
    api = httpx.Client(base_url=ui_service.base, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    models = api.get("/api/v1/models")
    if models.status_code == 404:
        pytest.skip("the model registry is not in this build: GET /api/v1/models answered 404")
    candidates = [m["version"] for m in models.json()["items"] if m["status"] != "serving"]
    assert candidates, f"the registry lists no version to promote: {models.json()}"
    version = candidates[0]
    sign_in(page, ui_service.base, admin)
    page.goto(f"{ui_service.base}/ui/#/admin/models")
    page.on("dialog", lambda d: d.accept("browser test"))  # the reason prompt, and "promote anyway" if asked
    page.locator(f'button[data-promote="{version}"]').click()
    page.wait_for_function(f"() => document.querySelector('#serving')?.textContent === {json.dumps(version)}")
    assert api.get("/api/v1/models").json()["serving"] == version
