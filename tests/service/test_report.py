"""The worker's quality report: validation metrics, preview.png and a self-contained report.html."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pytest

from api.core.storage import LocalStorage
from model.io.volume import Volume
from model.metrics import normalize_in_mask, psnr, ssim
from worker.report import BANNER, write_report

pytest.importorskip("matplotlib")


@pytest.fixture
def parts(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 1.2, 1.0])  # LPS-like voxel axes: the montage reorients to RAS
    brain = np.zeros((28, 24, 16), dtype=bool)
    brain[4:24, 4:20, 3:13] = True
    study = {m: Volume(np.where(brain, rng.random(brain.shape) * s, 0).astype(np.float32), affine)
             for m, s in (("t1", 500.0), ("t2", 900.0), ("flair", 300.0))}
    synth = Volume(np.where(brain, rng.random(brain.shape), 0).astype(np.float32), affine)
    std = Volume(np.where(brain, 0.1 * rng.random(brain.shape), 0).astype(np.float32), affine)
    result = SimpleNamespace(volumes={"flair": synth}, uncertainty={"flair": std})
    record = {"job_id": "j1", "model_version": "msgldm-tiny-x", "seed": 3, "steps": 2, "samples": 2,
              "targets": ["flair"], "timings_seconds": {"denoise": 1.5},
              "inputs": {m: {"sha256": "ab" * 32, "bytes": 10, "shape": list(brain.shape),
                             "nonfinite_voxels_set_to_0": 0, "reference": m == "flair"} for m in study},
              "synthesis": {"warnings": ["voxel size <differs>"], "reference": "t1"}}
    return SimpleNamespace(study=study, result=result, record=record, brain=brain, tmp=tmp_path,
                           storage=LocalStorage(tmp_path / "objects"))


def test_report_with_a_reference(parts):
    job = SimpleNamespace(targets=["flair"])
    keys = write_report(job, parts.result, parts.record, parts.study, parts.tmp, parts.storage, "jobs/j1/attempt-1")
    assert keys == {n: f"jobs/j1/attempt-1/{n}" for n in ("flair.reference.nii.gz", "preview.png", "report.html")}

    # metrics: the withheld FLAIR on the model's scale, scored by model/metrics.py
    y = normalize_in_mask(parts.study["flair"].data, parts.study["t1"].data > 0)
    p = parts.result.volumes["flair"].data
    metrics = parts.record["validation"]["metrics"]["flair"]
    assert metrics["psnr"] == pytest.approx(psnr(p, y, 1.0, mask=parts.brain), abs=1e-3)
    assert metrics["ssim"] == pytest.approx(ssim(p, y, 1.0), abs=1e-4)
    assert parts.record["timings_seconds"]["report"] > 0

    import matplotlib.image

    png = parts.tmp / "check.png"
    parts.storage.get_file(keys["preview.png"], png)
    image = matplotlib.image.imread(io.BytesIO(png.read_bytes()), format="png")
    assert image.shape[0] == 690 and image.shape[1] == int(2.2 * 100 * 5)  # 3 planes x (2 inputs, synth, std, ref)

    page = (parts.tmp / "report.html").read_text()
    assert BANNER in page and f"PSNR {metrics['psnr']:.2f} dB" in page and "msgldm-tiny-x" in page
    assert "voxel size &lt;differs&gt;" in page  # escaped
    assert "withheld from the model" in page
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must be self-contained"


def test_report_without_a_reference(parts):
    study = {m: v for m, v in parts.study.items() if m != "flair"}
    keys = write_report(SimpleNamespace(targets=["flair"]), parts.result, parts.record, study, parts.tmp,
                        parts.storage, "p")
    assert set(keys) == {"preview.png", "report.html"} and "validation" not in parts.record
