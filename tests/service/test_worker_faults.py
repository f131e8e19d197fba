"""A running job under cancellation and under a worker killed with SIGKILL (real processes, embedded stack)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.service.conftest import brats_files, create_key, start_process, stop_process, wait_for_job, worker_args


@pytest.fixture(params=["embedded"])
def stack(request, tmp_path, checkpoint):
    from tests.service.conftest import embedded_stack

    return embedded_stack(tmp_path, checkpoint)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> dict[str, bytes]:
    """16 axial slices of the shared BraTS case (nibabel's slicer keeps the affine exact): fast to synthesize."""
    import gzip

    import nibabel as nib

    files = brats_files()
    return {m: gzip.compress(nib.load(files[m]).slicer[:, :, 70:86].to_bytes(), compresslevel=1) for m in ("t1", "t2")}


def submit(client, study: dict[str, bytes], steps: int) -> str:
    r = client.post("/api/v1/synthesize", data={"targets": "flair", "steps": str(steps)},
                    files=[(m, (f"{m}.nii.gz", data)) for m, data in study.items()])
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_phase(client, job_id: str, phases: tuple[str, ...], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["phase"] in phases or job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {phases}")


def test_cancel_while_running_stops_between_steps(service, small_study):
    with service.client(create_key(service.stack, "integrator")) as client:
        job_id = submit(client, small_study, steps=1000)
        job = wait_phase(client, job_id, ("denoise",))
        assert job["status"] == "running", job
        assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
        job = wait_for_job(client, job_id, timeout=60)
        assert job["status"] == "cancelled" and job["results"] == {}, f"{job}\n{service.log_text()}"
        assert job["progress"] < 90  # it stopped during the 500 steps, not after them
        assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 409
        # the worker is still there and takes the next job
        assert wait_for_job(client, submit(client, small_study, steps=1))["status"] == "succeeded"


def test_worker_killed_mid_job_is_rerun(service, small_study, monkeypatch):
    with service.client(create_key(service.stack, "integrator")) as client:
        job_id = submit(client, small_study, steps=40)
        job = wait_phase(client, job_id, ("encode", "denoise", "decode"))
        assert job["status"] == "running" and job["attempts"] == 1
        stop_process(service.procs["worker"], signal.SIGKILL)  # the whole worker: parent and pool child
        service.procs["worker"] = start_process("worker2", worker_args(), service.env, service.logs)
        job = wait_for_job(client, job_id, timeout=600)
        assert job["status"] == "succeeded", f"{job}\n{service.log_text()}"
        assert job["attempts"] == 2
        assert set(job["results"]) == {"flair.nii.gz", "record.json", "preview.png", "report.html"}
    service.stack.apply(monkeypatch)
    from api.core.storage import get_storage

    keys = get_storage().list_keys(f"jobs/{job_id}/")
    results = [k for k in keys if "/inputs/" not in k]
    assert results and all("/attempt-2/" in k for k in results), keys  # one result set, the winning attempt's
