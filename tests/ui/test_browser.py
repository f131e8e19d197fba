"""The web UI in headless Chromium against real processes (uvicorn + a Celery worker on PostgreSQL, Redis and an
S3 server): sign in, watch a job appear and finish, open it in the NiiVue viewer (linked crosshair, slices,
window/level, the uncertainty overlay), download a result; admin pages."""

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

PIXELS = """id => {  // a panel's WebGL framebuffer, drawn now and read back at once (no preserveDrawingBuffer)
  const nv = window.msgldmViewer.panel(id).nv;
  nv.drawScene();
  const gl = nv.gl, w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
  const d = new Uint8Array(w * h * 4);
  gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, d);
  let hash = 0, lit = 0;
  for (let i = 0; i < d.length; i += 4) {
    hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) >>> 0;
    if (d[i] + d[i + 1] + d[i + 2] > 30) lit++;
  }
  return [w, h, hash, lit];
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
    requests: list[str] = []  # every request the page makes, checked at the end: none leaves the service
    page.on("request", lambda r: requests.append(r.url))
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

    # the job page: banner, one NiiVue panel per series, validation metrics from the worker's record
    row.get_by_role("link").click()
    page.wait_for_function("() => window.msgldmViewer !== undefined || document.querySelector('#viewer-box .error')",
                           timeout=300_000)  # WebGL on the CPU (SwiftShader) here: ~10 s a panel
    assert page.locator("#viewer-box .error").count() == 0, page.locator("#viewer-box").inner_text()
    assert BANNER in page.get_by_role("alert").first.inner_text()
    series = page.eval_on_selector_all("canvas", "cs => cs.map(c => c.dataset.series)")
    assert series == ["t1", "t2", "t1ce", "flair", "flair.reference", "flair.difference"]
    banners = page.locator("[data-banner]")  # over every synthesized panel, and only those
    assert banners.count() == 1 and banners.first.get_attribute("data-banner") == "flair"
    assert banners.first.inner_text() == BANNER and banners.first.is_visible()
    api = httpx.Client(base_url=ui_service.base, headers={"Authorization": f"Bearer {reader}"}, timeout=60)
    job = api.get(f"/api/v1/jobs/{job_id}").json()
    assert {"preview.png", "report.html", "flair.uncertainty.nii.gz", "flair.reference.nii.gz"} <= set(job["results"])
    record = api.get(job["results"]["record.json"]).json()
    psnr = record["validation"]["metrics"]["flair"]["paper_psnr"]
    assert f"{psnr:.2f}" in page.locator("#validation-metrics").inner_text()
    page.locator("#preview img").wait_for()
    shape = record["inputs"]["t1"]["shape"]  # BraTS voxel axes run along R, A, S (up to sign)
    assert page.evaluate("window.msgldmViewer.dims") == shape

    # every panel draws the volume (not a blank canvas)
    pixels = {s: page.evaluate(PIXELS, s) for s in series}
    assert all(p[3] > 1000 for p in pixels.values()), pixels

    # a click in one panel moves the crosshair of every panel to that point (NiiVue's own state, in mm)
    xhair = "window.msgldmViewer.crosshairs()"
    start_mm = page.evaluate(xhair)
    box = page.locator("canvas[data-series='t2']").bounding_box()
    page.mouse.click(box["x"] + 0.35 * box["width"], box["y"] + 0.6 * box["height"])
    moved = page.evaluate(xhair)
    assert moved["t2"] != start_mm["t2"], "the click did not move the crosshair"
    assert all(moved[s] == moved["t2"] for s in series), moved

    # scroll: keyboard, then the mouse wheel; every panel follows the same slice and its pixels change
    before = {s: page.evaluate(PIXELS, s) for s in ("t1", "flair")}
    label = page.locator("#slice-label")
    start = label.inner_text()
    page.locator(".viewer").focus()
    for _ in range(8):
        page.keyboard.press("ArrowUp")
    assert label.inner_text() != start
    after = {s: page.evaluate(PIXELS, s) for s in ("t1", "flair")}
    assert all(after[s][2] != before[s][2] for s in after), "a panel did not follow the slice change"
    assert len({tuple(v) for v in page.evaluate(xhair).values()}) == 1, "the panels' crosshairs differ"
    page.locator("canvas[data-series='flair']").hover()
    for _ in range(3):
        page.mouse.wheel(0, 120)
    page.wait_for_function(f"() => window.msgldmViewer.slice !== {int(start.split()[1]) - 1 + 8}")
    wheeled = page.evaluate(PIXELS, "flair")
    assert wheeled[2] != after["flair"][2]
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "job")
    page.locator("#preview img").scroll_into_view_if_needed()
    screenshot(page, "job-report")

    # window/level per panel: only that panel changes; Reset brings the first rendering back
    t1 = page.evaluate(PIXELS, "t1")
    page.locator("[data-window='flair']").fill("40")
    windowed = page.evaluate(PIXELS, "flair")
    assert windowed[2] != wheeled[2]
    assert page.evaluate(PIXELS, "t1") == t1
    page.locator("[data-reset='flair']").click()
    assert page.evaluate(PIXELS, "flair") == wheeled

    # the uncertainty overlay on the synthesized panel: off, on, more opaque
    page.locator("[data-overlay-toggle='flair/uncertainty']").uncheck()
    plain = page.evaluate(PIXELS, "flair")
    assert plain[2] != wheeled[2], "hiding the uncertainty overlay changed nothing"
    page.locator("[data-overlay-toggle='flair/uncertainty']").check()
    assert page.evaluate(PIXELS, "flair") == wheeled
    page.locator("[data-overlay-opacity='flair/uncertainty']").fill("100")
    assert page.evaluate(PIXELS, "flair")[2] not in (wheeled[2], plain[2])

    # zoom (Ctrl+wheel) and pan (middle-drag) are per panel: the others keep theirs
    pan = "id => Array.from(window.msgldmViewer.panel(id).nv.scene.pan2Dxyzmm)"
    t1_view = page.evaluate(pan, "t1")
    box = page.locator("canvas[data-series='flair']").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.keyboard.down("Control")
    page.mouse.wheel(0, -120)
    page.keyboard.up("Control")
    zoomed = page.evaluate(pan, "flair")
    assert zoomed[3] > 1, zoomed
    page.mouse.down(button="middle")
    page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 25, steps=4)
    page.mouse.up(button="middle")
    assert page.evaluate(pan, "flair")[:3] != zoomed[:3], "middle-drag did not pan"
    assert page.evaluate(pan, "t1") == t1_view

    # layouts: coronal steps through the volume's second axis; multiplanar shows three planes per panel
    page.locator(".viewer").focus()
    page.keyboard.press("c")
    assert page.locator("#slice-label").inner_text().startswith("coronal ")
    assert page.locator("#slice-label").inner_text().endswith(f"/ {shape[1]}")
    page.get_by_role("button", name="Multiplanar").click()
    assert page.evaluate("window.msgldmViewer.panels.every(p => p.nv.opts.sliceType === 3)")
    page.get_by_role("button", name="Axial").click()

    # download a result: the browser receives the same bytes the API serves
    with page.expect_download() as info:
        page.locator('button[data-result="flair.nii.gz"]').click()
    download = info.value
    assert download.suggested_filename == f"{job_id[:8]}-flair.nii.gz"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.read_bytes() == api.get(job["results"]["flair.nii.gz"]).content

    # nothing left the service's origin: the page, NiiVue and every volume came from it
    foreign = [u for u in requests if not u.startswith((ui_service.base + "/", "blob:", "data:"))]
    assert f"{ui_service.base}/ui/vendor/niivue.js" in requests and not foreign, foreign

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
    # the response, not the request: the route handler that records the POST has run once it is answered
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/cancel")):
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


def test_niivue_reads_what_nibabel_reads(ui_service, page):
    """The served NiiVue bundle in Chromium against nibabel (what the viewer relies on now that the UI has no
    NIfTI decoder of its own): both NIfTI versions, gzip, byte orders, datatypes, scaling, sform / qform-only,
    oblique and flipped axes, all on a RAS+ voxel grid."""
    page.goto(f"{ui_service.base}/ui/")
    read = """async ([b64, name]) => {
      const { NVImage } = await import('/ui/vendor/niivue.js');
      const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      const v = await NVImage.loadFromUrl({ url: name, name, buffer: bytes.buffer });
      const slope = v.hdr.scl_slope || 1, inter = v.hdr.scl_inter || 0;
      return { dims: v.dimsRAS.slice(1, 4), spacing: v.pixDimsRAS.slice(1, 4),
               data: Array.from(v.img2RAS(), x => x * slope + inter) };
    }"""
    for name, (raw, shape, expected, zooms) in _nifti_variants().items():
        file = f"{name}.nii.gz" if "gz" in name else f"{name}.nii"
        got = page.evaluate(read, [base64.b64encode(raw).decode(), file])
        assert got["dims"] == list(shape), (name, got["dims"], shape)
        np.testing.assert_allclose(got["data"], expected, rtol=1e-5, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(got["spacing"], zooms, rtol=1e-4, err_msg=name)


def test_raw_study_overlays_toggle_on_their_panels(ui_service, page):
    """A raw study's overlays (worker.native: the brain-mask outline and the registration edges, the very functions
    that make them) in the viewer as the job page hands them over: the outline on the input and synthesized panels,
    the edges on the synthesized one; each toggle and opacity changes that panel's pixels and no other's."""
    from worker.native import edges3d, outline

    page.goto(f"{ui_service.base}/ui/")
    x, y, _ = np.meshgrid(np.arange(64) - 32, np.arange(64) - 32, np.arange(6), indexing="ij")
    head = np.clip(1 - (x**2 + y**2) / 30**2, 0, 1).astype(np.float32) * (1 + 0.5 * (x > 4))
    mask = x**2 + y**2 < 24**2
    volumes = {"image": head, "outline": outline(mask), "edges": edges3d(head, mask)}
    assert volumes["outline"].any() and volumes["edges"].any()
    encoded = {k: base64.b64encode(gzip.compress(nib.Nifti1Image(v, np.diag([2.0, 2.0, 4.0, 1.0])).to_bytes())).decode()
               for k, v in volumes.items()}
    loaded = page.evaluate("""async (b) => {
      const { Viewer } = await import('/ui/js/viewer.js');
      const bytes = (k) => Uint8Array.from(atob(b[k]), (c) => c.charCodeAt(0)).buffer;
      const outline = { id: "outline", title: "brain mask outline", kind: "outline", bytes: bytes("outline"),
                        name: "outline.nii.gz" };
      const edges = { id: "edges", title: "registration edges", kind: "edges", bytes: bytes("edges"),
                      name: "edges.nii.gz" };
      const v = new Viewer([
        { id: "t1", title: "T1 (input)", bytes: bytes("image"), name: "t1.nii.gz", overlays: [outline] },
        { id: "flair", title: "FLAIR SYNTHETIC", bytes: bytes("image"), name: "flair.nii.gz", synthetic: true,
          overlays: [outline, edges] }]);
      document.querySelector("#view").replaceChildren(v.element);
      await v.load();
      window.msgldmViewer = v;
      return v.panels.map((p) => p.overlays.map((o) => o.id));
    }""", encoded)
    assert loaded == [["outline"], ["outline", "edges"]]
    screenshot(page, "raw-overlays")  # a phantom: the outline in yellow on both panels, the edges in cyan on one
    both, t1 = page.evaluate(PIXELS, "flair"), page.evaluate(PIXELS, "t1")
    page.locator("[data-overlay-toggle='flair/outline']").uncheck()
    no_outline = page.evaluate(PIXELS, "flair")
    assert no_outline[2] != both[2] and page.evaluate(PIXELS, "t1") == t1  # only that panel's outline
    page.locator("[data-overlay-toggle='flair/edges']").uncheck()
    plain = page.evaluate(PIXELS, "flair")
    assert plain[2] not in (both[2], no_outline[2]) and plain[3] < both[3]  # the overlays lit pixels
    page.locator("[data-overlay-toggle='flair/outline']").check()
    page.locator("[data-overlay-toggle='flair/edges']").check()
    assert page.evaluate(PIXELS, "flair") == both
    page.locator("[data-overlay-opacity='flair/edges']").fill("100")
    assert page.evaluate(PIXELS, "flair")[2] != both[2]
    page.locator("[data-overlay-toggle='t1/outline']").uncheck()
    assert page.evaluate(PIXELS, "t1")[2] != t1[2]
