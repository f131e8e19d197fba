"""Training runs and the model lifecycle through the API: dataset validation, the registry's promotion rules, and
an end-to-end run (real uvicorn, a Celery worker on the training queue and one on inference, PostgreSQL, Redis
and S3) whose training worker is killed with SIGKILL mid-run and resumes from its checkpoint."""

from __future__ import annotations

import signal
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import (
    BRATS,
    brats_files,
    create_key,
    embedded_stack,
    real_stack,
    start_process,
    stop_process,
    wait_for_job,
)

CASE = "BraTS-GLI-00001-000"
SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# evaluation kept small for the test: one target from the three others, 2 DDIM steps, a 5-step U-Net baseline
TRAINING_ENV = {"MSGLDM_TRAINING__EVAL_STEPS": "2", "MSGLDM_TRAINING__EVAL_TARGETS": "flair",
                "MSGLDM_TRAINING__EVAL_AVAILABLE": "3", "MSGLDM_TRAINING__BASELINE_STEPS": "5",
                "MSGLDM_TRAINING__THREADS": "1", "MSGLDM_TRAINING__CHECKPOINT_UPLOAD_SECONDS": "0",
                "MSGLDM_TRAINING__LEASE_SECONDS": "6"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared BraTS case cut to 16 axial slices (nibabel's slicer keeps the affine exact), in its BraTS 2023
    layout; and a broken copy whose FLAIR has other slices (a geometry problem)."""
    import nibabel as nib

    if not BRATS.is_dir():
        pytest.skip(f"shared sample data not found at {BRATS}")
    root = tmp_path_factory.mktemp("datasets")
    for name, flair_slices in (("good", slice(70, 86)), ("bad", slice(70, 80))):
        case = root / name / CASE
        case.mkdir(parents=True)
        for modality, suffix in SUFFIX.items():
            img = nib.load(BRATS / f"{CASE}-{suffix}.nii.gz")
            cut = img.slicer[:, :, flair_slices if modality == "flair" else slice(70, 86)]
            nib.save(cut, case / f"{CASE}-{suffix}.nii.gz")
    return {"good": root / "good", "bad": root / "bad"}


def run_body(path: Path, **extra: object) -> dict:
    return {"preset": "tiny", "dataset": {"path": str(path), "layout": "brats"}, "max_steps": [2, 2, 3],
            "batch_size": 2, **extra}


# ----------------------------------------------------------------------------------------------- API only


def test_dataset_validation_and_refusal(app_client, datasets, stack):
    from tests.service.conftest import run_cli

    admin = run_cli(stack, "keys", "create", "--name", "admin", "--role", "admin").strip().splitlines()[-1]
    integrator = run_cli(stack, "keys", "create", "--name", "pacs", "--role", "integrator").strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {admin}"}

    r = app_client.post("/api/v1/admin/datasets/validate?preset=tiny", headers=auth,
                        json={"path": str(datasets["good"]), "layout": "brats"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["valid"] and report["cases"] == 1 and report["problems"] == []
    assert report["modalities"] == {"t1": 1, "t2": 1, "t1ce": 1, "flair": 1}
    assert report["labels"]["brats2023"]["ET"] == [3]

    from api.core.storage import get_storage

    for f in sorted((datasets["good"] / CASE).iterdir()):  # the same case under an object-storage prefix
        get_storage().put_file(f"datasets/site-a/{CASE}/{f.name}", f)
    r = app_client.post("/api/v1/admin/datasets/validate", headers=auth,
                        json={"prefix": "datasets/site-a", "layout": "brats"})
    assert r.json()["valid"] and r.json()["cases"] == 1, r.json()
    r = app_client.post("/api/v1/admin/datasets/validate", headers=auth, json={"prefix": "datasets/none"})
    assert not r.json()["valid"] and "no objects" in r.json()["problems"][0]
    r = app_client.post("/api/v1/admin/datasets/validate", headers=auth,
                        json={"prefix": "datasets/site-a", "path": str(datasets["good"])})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"

    r = app_client.post("/api/v1/admin/datasets/validate", headers=auth,
                        json={"path": str(datasets["bad"]), "layout": "brats"})
    assert r.status_code == 200 and not r.json()["valid"]
    assert any("flair shape" in p for p in r.json()["problems"]), r.json()
    r = app_client.post("/api/v1/admin/datasets/validate", headers=auth,
                        json={"path": str(datasets["good"]), "layout": "wmh"})
    assert not r.json()["valid"] and r.json()["problems"], r.json()  # no WMH case in a BraTS folder

    # a run on an invalid dataset is refused with the report, and nothing is queued
    r = app_client.post("/api/v1/admin/training-runs", headers=auth, json=run_body(datasets["bad"]))
    assert r.status_code == 422 and r.json()["code"] == "invalid_dataset", r.text
    assert not r.json()["report"]["valid"] and r.json()["report"]["problems"]
    r = app_client.post("/api/v1/admin/training-runs", headers=auth, json=run_body(datasets["good"] / "nope"))
    assert r.status_code == 422 and "not a folder" in r.json()["report"]["problems"][0]
    assert app_client.get("/api/v1/admin/training-runs", headers=auth).json()["items"] == []

    r = app_client.post("/api/v1/admin/training-runs", headers=auth, json=run_body(datasets["good"], preset="nope"))
    assert r.status_code == 422 and r.json()["code"] == "unknown_preset"
    r = app_client.post("/api/v1/admin/training-runs", headers=auth, json=run_body(datasets["good"], stages=[2]))
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"  # stages 0-1 need a base version
    r = app_client.post("/api/v1/admin/training-runs", headers=auth,
                        json=run_body(datasets["good"], stages=[2], base_version="msgldm-tiny-000000000000"))
    assert r.status_code == 422 and r.json()["code"] == "unknown_base_version"
    assert app_client.get("/api/v1/admin/training-runs/nope", headers=auth).json()["code"] == "training_run_not_found"

    # admin only, except the model list
    other = {"Authorization": f"Bearer {integrator}"}
    assert app_client.post("/api/v1/admin/training-runs", headers=other,
                           json=run_body(datasets["good"])).json()["code"] == "forbidden"
    assert app_client.get("/api/v1/models", headers=other).json() == {"serving": None, "items": []}


def test_promotion_and_rollback_rules(app_client, stack):
    from sqlalchemy.exc import IntegrityError

    from api.core.db import session_scope
    from api.core.models import ModelVersion
    from tests.service.conftest import run_cli

    admin = run_cli(stack, "keys", "create", "--name", "admin", "--role", "admin").strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {admin}"}
    good = {"mean": {"psnr": 30.0, "ssim": 0.9}, "baselines": {"nearest": {"psnr": 20.0, "ssim": 0.7}},
            "beats_baselines": True}
    weak = {**good, "beats_baselines": False}
    with session_scope() as session:
        session.add_all([ModelVersion(version="v-default", status="serving", preset="tiny", local_path="/x"),
                         ModelVersion(version="v-good", preset="tiny", metrics=good, storage_prefix="models/v-good/"),
                         ModelVersion(version="v-weak", preset="tiny", metrics=weak, storage_prefix="models/v-weak/")])
    with pytest.raises(IntegrityError), session_scope() as session:  # the database allows one serving version
        session.add(ModelVersion(version="v-second", status="serving"))

    def post(path: str, **body: object) -> httpx.Response:
        return app_client.post(f"/api/v1/admin/models/{path}", headers=auth, json=body or None)

    r = post("v-weak/promote")
    assert r.status_code == 409 and r.json()["code"] == "below_baselines"
    assert post("v-default/rollback").json()["code"] == "nothing_to_roll_back"  # it replaced nothing
    assert post("v-good/rollback").json()["code"] == "nothing_to_roll_back"  # not serving
    assert post("v-none/promote").json()["code"] == "model_version_not_found"

    r = post("v-good/promote")
    assert r.status_code == 200 and r.json()["status"] == "serving" and r.json()["previous_version"] == "v-default"
    assert post("v-good/promote").json()["code"] == "already_serving"
    r = post("v-weak/promote", force=True, reason="clinic asked for it")
    assert r.status_code == 200 and r.json()["forced"] and r.json()["previous_version"] == "v-good"
    models = app_client.get("/api/v1/models", headers=auth).json()
    assert models["serving"] == "v-weak"
    assert {m["version"]: m["status"] for m in models["items"]} == {
        "v-default": "retired", "v-good": "retired", "v-weak": "serving"}

    r = post("v-weak/rollback")
    assert r.status_code == 200 and r.json()["version"] == "v-good" and r.json()["status"] == "serving"
    r = post("v-good/rollback")
    assert r.status_code == 200 and r.json()["version"] == "v-default"
    assert app_client.get("/api/v1/models", headers=auth).json()["serving"] == "v-default"


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(params=["embedded", "real"])
def stack(request, tmp_path, checkpoint):
    """Both stacks for the API tests; the end-to-end run only on the real one (its cost)."""
    if request.param == "embedded":
        if request.node.name.startswith("test_training_run_end_to_end"):
            pytest.skip("the end-to-end training run is exercised on the real stack (PostgreSQL, Redis, S3)")
        s = embedded_stack(tmp_path, checkpoint)
    else:
        s = real_stack(checkpoint, request.getfixturevalue("s3_server"))
    s.env |= TRAINING_ENV | {"MSGLDM_TRAINING__WORK_DIR": str(tmp_path / "training"),
                             "MSGLDM_INFERENCE__CACHE_DIR": str(tmp_path / "model-cache")}
    yield s
    from tests.service.conftest import clear_caches

    clear_caches()
    for fn in s.cleanup:
        fn()


def trainer_args() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "training", "-c", "1",
            "--loglevel", "INFO", "-n", f"trainer-{uuid.uuid4().hex[:6]}@%h"]


def trainer_pids(run_id: str) -> list[int]:
    """Processes whose command line names the run (the trainer writes under its run folder)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and run_id.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def wait_run(client: httpx.Client, run_id: str, until, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/v1/admin/training-runs/{run_id}").json()
        if until(run):
            return run
        time.sleep(0.3)
    raise AssertionError(f"training run {run_id} did not get there in {timeout}s: {run}")


def synthesize(client: httpx.Client, study: dict[str, bytes]) -> dict:
    r = client.post("/api/v1/synthesize", data={"targets": "flair", "steps": "2"},
                    files=[(m, (f"{m}.nii.gz", data)) for m, data in study.items()])
    assert r.status_code == 202, r.text
    return wait_for_job(client, r.json()["id"])


def test_training_run_end_to_end(service, datasets, monkeypatch):
    """Run (tiny preset, a few steps) -> trainer killed with -9 after its first checkpoint -> resumed on a new
    worker (attempt 2, history continues) -> candidate with metrics -> promotion serves it from the next job ->
    rollback serves the previous version again."""
    import gzip

    import nibabel as nib

    files = brats_files()
    study = {m: gzip.compress(nib.load(files[m]).slicer[:, :, 70:86].to_bytes(), compresslevel=1)
             for m in ("t1", "t2")}
    trainer = start_process("trainer", trainer_args(), service.env, service.logs)
    admin = service.client(create_key(service.stack, "admin"))
    try:
        default = admin.get("/api/v1/models").json()
        assert default["serving"] and default["items"][0]["status"] == "serving", default  # the configured one

        r = admin.post("/api/v1/admin/training-runs", json=run_body(datasets["good"]))
        assert r.status_code == 202 and r.headers["location"].endswith(r.json()["id"]), r.text
        run_id = r.json()["id"]
        assert r.json()["status"] == "queued" and r.json()["attempts"] == 0

        # first checkpoint in object storage, then the whole training worker dies
        run = wait_run(admin, run_id, lambda x: x["checkpoint"] is not None
                       or x["status"] not in ("queued", "running"))
        assert run["status"] == "running" and "stage0.pt" in run["checkpoint"]["files"], \
            f"{run}\n{service.log_text()}"
        stop_process(trainer, signal.SIGKILL)
        trainer = start_process("trainer2", trainer_args(), service.env, service.logs)

        run = wait_run(admin, run_id, lambda x: x["status"] in ("succeeded", "failed", "cancelled"))
        assert run["status"] == "succeeded", f"{run}\n{service.log_text()}"
        assert run["attempts"] == 2 and run["progress"] == 100 and run["model_version"]
        stages = [h["stage"] for h in run["history"]]
        assert stages == [0, 1, 2], run["history"]  # stage 0 validated once: attempt 2 resumed, did not redo it
        assert all(h["losses"] and h["val"] and h["epoch"] is not None for h in run["history"])
        # the trainer's gates reach the run (tiny: recorded, not stopping), one per stage, across both attempts
        assert sorted(run["gates"]) == ["stage0", "stage1", "stage2"], run["gates"]
        assert run["gates"]["stage0"]["name"] == "autoencoder_brain_psnr" and run["gates"]["stage0"]["threshold"] == 28

        models = admin.get("/api/v1/models").json()
        candidate = next(m for m in models["items"] if m["version"] == run["model_version"])
        assert candidate["status"] == "candidate" and candidate["training_run_id"] == run_id
        assert models["serving"] == default["serving"]  # a run never replaces the serving model by itself
        metrics = candidate["metrics"]
        assert set(metrics["per_target"]) == {"flair"} and metrics["in_sample"] is True
        assert set(metrics["baselines"]) == {"nearest", "unet"} and isinstance(metrics["beats_baselines"], bool)
        assert metrics["mean"]["psnr"] == metrics["per_target"]["flair"]["psnr"]

        r = admin.post(f"/api/v1/admin/models/{candidate['version']}/promote", json={})
        if not metrics["beats_baselines"]:
            assert r.status_code == 409 and r.json()["code"] == "below_baselines"
            r = admin.post(f"/api/v1/admin/models/{candidate['version']}/promote",
                           json={"force": True, "reason": "test"})
        assert r.status_code == 200 and r.json()["status"] == "serving", r.text

        job = synthesize(admin, study)  # the worker serves the new version from its next job, no restart
        assert job["status"] == "succeeded" and job["model_version"] == candidate["version"], job
        record = admin.get(f"/api/v1/jobs/{job['id']}/results/record.json").json()
        assert record["model_version"] == candidate["version"]

        r = admin.post(f"/api/v1/admin/models/{candidate['version']}/rollback")
        assert r.status_code == 200 and r.json()["version"] == default["serving"], r.text
        job = synthesize(admin, study)
        assert job["status"] == "succeeded" and job["model_version"] == default["serving"], job

        # cancel while training: the trainer's process group goes (and the GPU memory it held with it)
        long_run = admin.post("/api/v1/admin/training-runs", json=run_body(datasets["good"], max_steps=100000)).json()
        wait_run(admin, long_run["id"], lambda x: bool(trainer_pids(long_run["id"])), timeout=120)
        assert admin.post(f"/api/v1/admin/training-runs/{long_run['id']}/cancel").status_code == 200
        cancelled = wait_run(admin, long_run["id"], lambda x: x["status"] != "running", timeout=60)
        assert cancelled["status"] == "cancelled" and cancelled["model_version"] is None, cancelled
        assert not trainer_pids(long_run["id"])
        assert admin.post(f"/api/v1/admin/training-runs/{long_run['id']}/cancel").json()["code"] == "invalid_state"
        listed = admin.get("/api/v1/admin/training-runs", params={"limit": 1}).json()
        assert [r["id"] for r in listed["items"]] == [long_run["id"]] and listed["next_cursor"]
        older = admin.get("/api/v1/admin/training-runs", params={"cursor": listed["next_cursor"]}).json()
        assert [r["id"] for r in older["items"]] == [run_id]
    finally:
        admin.close()
        stop_process(trainer)
    service.stack.apply(monkeypatch)
    from api.core.storage import get_storage

    keys = get_storage().list_keys(f"training-runs/{run_id}/")
    assert f"training-runs/{run_id}/checkpoint/stage2.pt" in keys and any(k.endswith("report.json") for k in keys)
    assert get_storage().list_keys(f"models/{candidate['version']}/")
