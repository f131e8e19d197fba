"""20 concurrent submissions with one Idempotency-Key against a real uvicorn: one job, one set of inputs."""

from __future__ import annotations

import gzip
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from tests.service.conftest import create_key


def test_concurrent_replays_make_one_job(service, monkeypatch):
    volume = nib.Nifti1Image(np.random.default_rng(1).random((24, 24, 12)).astype(np.float32), np.eye(4))
    data = gzip.compress(volume.to_bytes())
    key = create_key(service.stack, "integrator")

    def submit(_: int):
        with service.client(key) as client:
            return client.post("/api/v1/synthesize", headers={"Idempotency-Key": "race-1"},
                               data={"targets": "flair", "steps": "1"},
                               files=[("t1", ("t1.nii.gz", data)), ("t2", ("t2.nii.gz", data))])

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(submit, range(20)))
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses if r.status_code != 202]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    with service.client(key) as client:
        assert [j["id"] for j in client.get("/api/v1/jobs").json()["items"]] == list(ids)
    from api.core.storage import get_storage

    service.stack.apply(monkeypatch)
    inputs = [k for k in get_storage().list_keys("jobs/") if "/inputs/" in k]
    assert sorted(inputs) == sorted(f"jobs/{next(iter(ids))}/inputs/{m}.nii.gz" for m in ("t1", "t2")), inputs
