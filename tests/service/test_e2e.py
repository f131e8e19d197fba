"""End to end through real processes: uvicorn + a Celery worker, on the embedded defaults and on
PostgreSQL + Redis + an S3 server. The shared BraTS case goes in without FLAIR; a FLAIR comes back on the
input grid."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

from tests.service.conftest import brats_files, create_key, wait_for_job


def test_synthesize_missing_flair(service):
    files = brats_files()
    inputs = {m: files[m] for m in ("t1", "t1ce", "t2")}
    reference = nib.load(inputs["t1"])
    key = create_key(service.stack, "integrator")
    with service.client(key) as client:
        r = client.post("/api/v1/synthesize", data={"targets": "flair", "steps": "2", "seed": "7"},
                        files=[(m, (p.name, p.read_bytes(), "application/gzip")) for m, p in inputs.items()])
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["id"], timeout=600)
        assert job["status"] == "succeeded", f"{job}\n{service.log_text()}"
        assert job["attempts"] == 1 and job["progress"] == 100 and job["phase"] == "done"
        assert job["model_version"] and job["started_at"] and job["finished_at"]
        assert set(job["results"]) == {"flair.nii.gz", "record.json", "preview.png", "report.html"}

        download = client.get(job["results"]["flair.nii.gz"])
        assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
        flair = nib.Nifti1Image.from_bytes(gzip.decompress(download.content))
        assert flair.shape == reference.shape
        np.testing.assert_allclose(flair.affine, reference.affine, atol=1e-5)
        data = np.asarray(flair.dataobj)
        assert data.dtype == np.float32 and np.isfinite(data).all() and data.max() > 0

        record = client.get(job["results"]["record.json"]).json()
        assert record["seed"] == 7 and record["steps"] == 2 and record["model_version"] == job["model_version"]
        assert set(record["inputs"]) == {"t1", "t1ce", "t2"} and record["timings_seconds"]
        assert record["synthesis"]["reference"] == "t1" and record["synthesis"]["slices"] > 0

        # the radiologist reads it; a second integrator cannot
        reader = create_key(service.stack, "radiologist")
        with service.client(reader) as other:
            assert other.get(job["results"]["flair.nii.gz"]).content == download.content
        with service.client(create_key(service.stack, "integrator")) as stranger:
            assert stranger.get(f"/api/v1/jobs/{job['id']}").status_code == 404
