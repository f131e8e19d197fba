"""The web UI in headless Chromium against real processes (uvicorn + a Celery worker on PostgreSQL, Redis and an
S3 server): sign in, watch a job appear and finish, open it, scroll slices, download a result; admin pages."""

from __future__ import annotations

import base64
import gzip
import json
import os
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from tests.service.conftest import brats_files, clear_caches, create_key
from tests.ui.conftest import screenshot

PIXELS = """s => {
  const c = document.querySelector(`canvas[data-series='${s}']`);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let hash = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) { hash = (hash * 31 + d[i]) >>> 0; sum += d[i]; }
  return [c.width, c.height, hash, sum];
}"""
BANNER = "SYNTHETIC - not for primary diagnosis"
STEPS = os.environ.get("MSGLDM_UI_STEPS", "2")  # ops/screenshots.py asks for more with the bundled model
JOB_TIMEOUT_MS = 1000 * int(os.environ.get("MSGLDM_UI_JOB_TIMEOUT", "600"))


def sign_in(page, base: str, key: str) -> None:
    page.goto(f"{base}/")
    assert page.url.endswith("/ui/"), page.url  # / redirects to the UI
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def submit_validation_job(base: str, key: str) -> str:
    """T1, T1CE, T2 in; FLAIR synthesized with 2 samples (uncertainty) and scored against the uploaded FLAIR."""
    files = brats_files()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        r = client.post("/api/v1/synthesize", data={"targets": "flair", "reference": "true", "steps": STEPS,
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
    page.locator(f'tr[data-job="{job_id}"][data-status="succeeded"]').wait_for(timeout=JOB_TIMEOUT_MS)
    screenshot(page, "jobs")

    # filters: status (asked of the server) and target (in the page)
    page.select_option("#filter-status", "failed")
    page.get_by_text("No jobs match.").wait_for()
    page.select_option("#filter-status", "succeeded")
    row.wait_for()
    page.select_option("#filter-target", "t1")
    page.get_by_text("No jobs match.").wait_for()
    page.select_option("#filter-target", "flair")
    row.wait_for()

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
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "job")
    page.locator("#preview img").scroll_into_view_if_needed()
    screenshot(page, "job-report")

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


def _register_candidate(stack, monkeypatch, tmp_path) -> str:
    """A second (random-weight, never evaluated) checkpoint uploaded and registered as a training run would."""
    from api.core import registry
    from api.core.db import session_scope
    from api.core.storage import get_storage
    from model.checkpoint import checkpoint_version, init_checkpoint

    stack.apply(monkeypatch)
    ckpt = init_checkpoint("tiny", tmp_path / "candidate", seed=1)
    version, prefix = checkpoint_version(ckpt), f"models/{checkpoint_version(ckpt)}/"
    for f in sorted(ckpt.iterdir()):
        get_storage().put_file(prefix + f.name, f)
    with session_scope() as session:
        registry.register_candidate(session, version=version, storage_prefix=prefix, preset="tiny",
                                    modalities=["t1", "t2", "t1ce", "flair"], metrics={}, training_run_id=None,
                                    base_version=None)
    clear_caches()
    return version


def test_admin_promotes_a_version(ui_service, page, monkeypatch, tmp_path):
    """Promotion from the admin page of a candidate that was never shown to beat the baselines: the page asks for
    a reason, the API answers below_baselines, the page asks again and promotes with force; then roll back."""
    admin = create_key(ui_service.stack, "admin")
    api = httpx.Client(base_url=ui_service.base, headers={"Authorization": f"Bearer {admin}"}, timeout=60)
    version = _register_candidate(ui_service.stack, monkeypatch, tmp_path)
    before = api.get("/api/v1/models").json()["serving"]
    sign_in(page, ui_service.base, admin)
    page.goto(f"{ui_service.base}/ui/#/admin/models")
    page.on("dialog", lambda d: d.accept("browser test"))  # the reason prompt, and "promote anyway" if asked
    page.locator(f'button[data-promote="{version}"]').click()
    page.wait_for_function(f"() => document.querySelector('#serving')?.textContent === {json.dumps(version)}")
    assert api.get("/api/v1/models").json()["serving"] == version
    assert api.post(f"/api/v1/admin/models/{version}/rollback").json()["version"] == before
    audit = api.get("/api/v1/admin/audit", params={"action": "model.promote"}).json()["items"]
    assert audit and audit[0]["target_id"] == version and audit[0]["detail"]["forced"] is True


MODELS = {  # shaped as in the registry contract (briefs/contract.md), for the UI's rendering of it
    "serving": "msgldm-tiny-aaaa00000001",
    "items": [
        {"version": "msgldm-tiny-bbbb00000002", "status": "candidate", "preset": "tiny",
         "created_at": "2026-11-21T10:00:00Z", "promoted_at": None, "training_run_id": "run-2", "base_version": None,
         "metrics": {"per_target": {"t2": {"psnr": 24.1, "ssim": 0.871}, "flair": {"psnr": 22.9, "ssim": 0.842}},
                     "mean": {"psnr": 23.5, "ssim": 0.8565},
                     "baselines": {"nearest": {"psnr": 19.0, "ssim": 0.71}, "unet": {"psnr": 23.0, "ssim": 0.84}},
                     "beats_baselines": True}},
        {"version": "msgldm-tiny-aaaa00000001", "status": "serving", "preset": "tiny",
         "created_at": "2026-11-20T10:00:00Z", "promoted_at": "2026-11-20T11:00:00Z", "training_run_id": "run-1",
         "base_version": None,
         "metrics": {"per_target": {"t2": {"psnr": 22.0, "ssim": 0.85}, "flair": {"psnr": 21.5, "ssim": 0.83}},
                     "mean": {"psnr": 21.75, "ssim": 0.84}, "baselines": {}, "beats_baselines": False}},
    ],
}
RUN = {"id": "5f0c2d9e-0000-4000-8000-000000000001", "status": "running", "stage": 1, "progress": 40, "preset": "tiny",
       "dataset": {"path": "/data/brats", "layout": "brats2023"}, "created_at": "2026-11-22T02:00:00Z",
       "started_at": "2026-11-22T02:00:05Z", "finished_at": None, "model_version": None, "error_code": None,
       "error_message": None, "attempts": 1, "log_tail": "stage 1 epoch 3 step 30 loss 0.21\n",
       "history": [{"stage": s, "epoch": 1 + i // 5, "step": 10 * i, "losses": {"mse": 1.0 / (1 + i + 3 * s)},
                    "val": {"psnr": 15 + i + 2 * s} if i % 3 == 0 else {}} for s in (0, 1) for i in range(10)]}


def test_admin_pages_render_the_registry_contract(ui_service, page):
    """The admin pages against the contract's payloads (the registry is another helper's, not in this build):
    metrics side by side, promote sends the contract's body, training curves are drawn, cancel posts."""
    posted: list[tuple[str, dict]] = []

    def registry(route):
        req = route.request
        if req.method == "POST":
            posted.append((req.url.split("/api/v1")[1], req.post_data_json or {}))
            return route.fulfill(json=MODELS["items"][0] if "models" in req.url else {**RUN, "status": "cancelled"})
        if req.url.endswith("/models"):
            return route.fulfill(json=MODELS)
        if req.url.endswith("/training-runs"):
            return route.fulfill(json={"items": [RUN], "next_cursor": None})
        return route.fulfill(json=RUN)

    page.route("**/api/v1/models", registry)
    page.route("**/api/v1/admin/**", registry)
    sign_in(page, ui_service.base, create_key(ui_service.stack, "admin"))
    page.get_by_role("link", name="Models").click()
    table = page.locator("#models")
    table.wait_for()
    assert page.locator("#serving").inner_text() == MODELS["serving"]
    candidate = table.locator('tr[data-version="msgldm-tiny-bbbb00000002"]').inner_text()
    assert all(v in candidate for v in ("24.10", "0.871", "22.90", "23.50", "23.00 / 0.840", "yes")), candidate
    screenshot(page, "admin-models")
    page.on("dialog", lambda d: d.accept("better FLAIR"))
    page.locator('button[data-promote="msgldm-tiny-bbbb00000002"]').click()
    page.get_by_text("Done.").wait_for()
    assert posted == [("/admin/models/msgldm-tiny-bbbb00000002/promote", {"force": False, "reason": "better FLAIR"})]

    page.get_by_role("link", name="Training").click()
    page.locator("#run-detail svg.plot polyline").first.wait_for()
    assert page.locator("#run-detail svg.plot").count() == 2
    assert page.locator("#run-detail svg.plot polyline").count() == 4  # loss and val, stages 0 and 1
    screenshot(page, "admin-training")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/cancel")):
        page.get_by_role("button", name="Cancel run").click()
    assert posted[-1][0] == f"/admin/training-runs/{RUN['id']}/cancel"


def _nifti_variants() -> dict[str, tuple[bytes, tuple[int, ...], np.ndarray, tuple[float, ...]]]:
    """NIfTI files the page must read, with what nibabel makes of them in RAS+: shape, voxels (x fastest), sizes."""
    rng = np.random.default_rng(1)
    data = (rng.random((7, 6, 5)) * 1000).astype(np.float32)
    tilt = np.radians(8)
    oblique = np.array([[0, 0, 1.5, -4], [np.cos(tilt), -np.sin(tilt), 0, 7], [np.sin(tilt), np.cos(tilt), 0, 2],
                        [0, 0, 0, 1]])
    lps = np.diag([-0.9, -1.1, 2.0, 1.0])
    made = {
        "nifti1-gz-float32-lps-sform": nib.Nifti1Image(data, lps),
        "nifti2-int16-scaled-oblique": nib.Nifti2Image(data.astype(np.int16), oblique),
        "nifti1-big-endian": nib.Nifti1Image(data, lps, nib.Nifti1Header(endianness=">")),
    }
    made["nifti2-int16-scaled-oblique"].header.set_slope_inter(0.5, -3)
    qform_only = nib.Nifti1Image(data.astype(np.uint8), oblique)
    qform_only.set_qform(oblique, code=1)
    qform_only.set_sform(None, code=0)
    made["nifti1-qform-only-uint8"] = qform_only
    out = {}
    for name, img in made.items():
        raw = img.to_bytes()
        back = type(img).from_bytes(raw)
        canon = nib.as_closest_canonical(back)
        out[name] = (gzip.compress(raw) if "gz" in name else raw, canon.shape,
                     np.asarray(canon.get_fdata()).ravel(order="F"), canon.header.get_zooms()[:3])
    return out


def test_nifti_reader_matches_nibabel(ui_service, page):
    """api/ui/js/nifti.js in Chromium against nibabel: both NIfTI versions, gzip, byte orders, datatypes,
    scaling, sform / qform-only, oblique and flipped axes (all reoriented to RAS+)."""
    page.goto(f"{ui_service.base}/ui/")
    read = """async b64 => {
      const { readNifti } = await import('/ui/js/nifti.js');
      const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      const v = await readNifti(bytes.buffer);
      return { dims: v.dims, spacing: v.spacing, data: Array.from(v.data) };
    }"""
    for name, (raw, shape, expected, zooms) in _nifti_variants().items():
        got = page.evaluate(read, base64.b64encode(raw).decode())
        assert got["dims"] == list(shape), (name, got["dims"], shape)
        np.testing.assert_allclose(got["data"], expected, rtol=1e-5, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(got["spacing"], zooms, rtol=1e-4, err_msg=name)
