"""The worker's quality report: validation metrics, preview.png and a self-contained report.html."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import numpy as np
import pytest

from model.config import MSGLDMConfig
from model.evaluate import prepare_reference, score
from model.io.volume import Volume
from worker.native import JobResult
from worker.report import BANNER, write_report

CFG = MSGLDMConfig()  # the default preprocessing of the model (model/config.py)

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
    result = JobResult(volumes={"flair": synth}, uncertainty={"flair": std}, timings={})
    record = {"job_id": "j1", "model_version": "msgldm-tiny-x", "seed": 3, "steps": 2, "samples": 2,
              "targets": ["flair"], "timings_seconds": {"denoise": 1.5},
              "inputs": {m: {"sha256": "ab" * 32, "bytes": 10, "shape": list(brain.shape),
                             "nonfinite_voxels_set_to_0": 0, "reference": m == "flair"} for m in study},
              "synthesis": {"warnings": ["voxel size <differs>"], "reference": "t1"}}
    return SimpleNamespace(study=study, result=result, record=record, brain=brain, tmp=tmp_path)


def report(parts, study, targets=("flair",)):
    return write_report(SimpleNamespace(targets=list(targets)), parts.result, parts.record, study, parts.tmp,
                        preprocess_cfg=CFG.preprocess, modalities=CFG.modalities)


def test_report_with_a_reference(parts):
    files = report(parts, parts.study)
    assert set(files) == {"flair.reference.nii.gz", "preview.png", "report.html"}

    # metrics: the registry's numbers, both protocols, exactly as python -m model.evaluate scores a case
    case = SimpleNamespace(id="j1", layout="brats2023", seg_is_prediction=False)
    expected = score(parts.result.volumes["flair"], "flair",
                     prepare_reference(case, parts.study, None, CFG.modalities, CFG.preprocess))
    metrics = parts.record["validation"]["metrics"]["flair"]
    assert set(metrics) == set(expected) and metrics["slices"] == expected["slices"] > 0
    for name in ("paper_psnr", "paper_ssim", "mae", "brasyn_psnr", "brasyn_ssim"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-4), name
    assert "paper protocol (2D)" in parts.record["validation"]["protocol"]
    assert parts.record["timings_seconds"]["report"] > 0

    import matplotlib.image

    image = matplotlib.image.imread(io.BytesIO(files["preview.png"].read_bytes()), format="png")
    assert image.shape[0] == 690 and image.shape[1] == int(2.2 * 100 * 5)  # 3 planes x (2 inputs, synth, std, ref)

    page = (parts.tmp / "report.html").read_text()
    assert BANNER in page and "msgldm-tiny-x" in page
    assert (f"paper 2D: PSNR {metrics['paper_psnr']:.2f} dB, SSIM {metrics['paper_ssim']:.4f}" in page
            and f"BraSyn 3D: PSNR {metrics['brasyn_psnr']:.2f} dB" in page)
    assert "voxel size &lt;differs&gt;" in page  # escaped
    assert "withheld from the model" in page
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must be self-contained"


def test_report_without_a_reference(parts):
    study = {m: v for m, v in parts.study.items() if m != "flair"}
    files = report(parts, study)
    assert set(files) == {"preview.png", "report.html"} and "validation" not in parts.record
