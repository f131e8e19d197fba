"""The job page shows a job's deliveries to PACS live (docs/pacs.md): pending with the error while the Orthanc is
down, delivered with its verification time once it is up; against real processes and a real Orthanc."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.service.conftest import clear_caches, create_key, real_stack, running_service
from tests.service.orthanc import Orthanc, orthanc_missing
from tests.ui.test_browser import sign_in

pytestmark = pytest.mark.skipif(bool(orthanc_missing()), reason=orthanc_missing() or "")


def _volume(seed: int) -> bytes:
    img = nib.Nifti1Image(np.random.default_rng(seed).random((24, 24, 12)).astype(np.float32), np.eye(4))
    return img.to_bytes()  # an uncompressed .nii


def test_job_page_shows_deliveries_live(checkpoint: Path, s3_server: str, tmp_path: Path, page):
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.write_password()  # configured, but not started yet: the PACS is down
    stack = real_stack(checkpoint, s3_server)
    stack.env |= {"MSGLDM_DICOM__NODES": json.dumps({"orthanc": orthanc.node()}),
                  "MSGLDM_DICOM__DELIVERY_BACKOFF_SECONDS": "1", "MSGLDM_DICOM__DELIVERY_BACKOFF_MAX_SECONDS": "2",
                  "MSGLDM_DICOM__DELIVERY_MAX_ATTEMPTS": "100"}
    try:
        (tmp_path / "svc").mkdir()
        with running_service(stack, tmp_path / "svc") as svc:
            key = create_key(stack, "integrator")
            with httpx.Client(base_url=svc.base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                files = [(m, (f"{m}.nii", _volume(i))) for i, m in enumerate(("t1", "t1ce", "t2"))]
                r = c.post("/api/v1/synthesize", files=files,
                           data={"targets": "flair", "deliver_to": "orthanc", "steps": "1", "preprocess": "none"})
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
            sign_in(page, svc.base, key)
            page.goto(f"{svc.base}/ui/#/jobs/{job_id}")
            row = page.locator('#deliveries tr[data-node="orthanc"]')
            row.wait_for(timeout=120_000)
            page.wait_for_function("() => /Connect/.test(document.querySelector('#deliveries "
                                   "tr[data-node=orthanc]').innerText)", timeout=180_000)
            assert "pending" in row.inner_text()
            orthanc.start()
            page.wait_for_function("() => /delivered/.test(document.querySelector('#deliveries "
                                   "tr[data-node=orthanc]').innerText)", timeout=120_000)
            text = row.inner_text()
            assert "12" in text and "Connect" not in text, text  # 12 instances, the error cleared
    finally:
        orthanc.stop()
        clear_caches()
        for fn in stack.cleanup:
            fn()
