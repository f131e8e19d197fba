"""Evaluation: subsets grid, axial cropping, scoring, the report, and the CLI on a random tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.baselines import NearestModalityBaseline
from model.config import PreprocessConfig
from model.data import find_cases, load_case
from model.evaluate import (
    Method,
    available_subsets,
    axial_axis,
    baseline_method,
    crop_axial,
    evaluate_cases,
    prepare_reference,
    score,
)
from model.io.volume import Volume
from model.tables import markdown_report, summarize

MODS = ("t1", "t2", "t1ce", "flair")
LPS = np.array([[-1.0, 0, 0, 120], [0, -1, 0, 120], [0, 0, 1, -60], [0, 0, 0, 1]])


def _phantom(shape=(28, 28, 14), seed=0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    brain = r < 0.85
    tissue = 0.5 + 0.4 * np.sin(4 * g[0]) * np.cos(3 * g[1]) + 0.02 * rng.standard_normal(shape)
    tumour = brain & (np.sqrt(((g - np.array([0.3, 0.2, 0.0])[:, None, None, None]) ** 2).sum(0)) < 0.3)
    t1 = np.where(brain, 100 + 200 * tissue, 0)
    t2 = np.where(brain, 100 + 200 * (1 - tissue) + 80 * tumour, 0)
    t1ce = t1 + 150 * tumour
    flair = np.where(brain, t2**2 / 300, 0)
    seg = np.where(tumour, 2, 0) + np.where(tumour & (r < 0.45), 2, 0)  # labels 2 (edema) and 4 (enhancing)
    return {"t1": t1, "t2": t2, "t1ce": t1ce, "flair": flair}, seg.astype(np.uint8)


def _write_case(root: Path, case_id: str, seed: int, shape=(28, 28, 14)) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    images, seg = _phantom(shape, seed=seed)
    for mod, arr in images.items():
        nib.save(nib.Nifti1Image(arr.astype(np.float32), LPS), str(folder / f"{case_id}_{mod}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, LPS), str(folder / f"{case_id}_seg.nii.gz"))
    return folder


def test_available_subsets_grid():
    subsets = available_subsets(MODS)
    assert len(subsets) == 14 and all(1 <= len(s) <= 3 for s in subsets)
    assert available_subsets(MODS, counts=[3]) == [("t1", "t2", "t1ce"), ("t1", "t2", "flair"),
                                                   ("t1", "t1ce", "flair"), ("t2", "t1ce", "flair")]
    limited = available_subsets(MODS, max_per_count=2, seed=1)
    assert [len(s) for s in limited] == [1, 1, 2, 2, 3, 3]
    assert limited == available_subsets(MODS, max_per_count=2, seed=1)  # deterministic
    assert available_subsets(MODS, counts=[0, 4, 5]) == []


def test_crop_axial_keeps_world_coordinates():
    images, seg = _phantom()
    vols = {m: Volume(a.astype(np.float32), LPS) for m, a in images.items()}
    assert axial_axis(LPS) == 2
    cropped, cseg = crop_axial(vols, Volume(seg.astype(np.float32), LPS), 6)
    v = cropped["t1"]
    assert v.shape == (28, 28, 6) and cseg is not None and cseg.shape == (28, 28, 6)
    start = int(round(np.linalg.solve(LPS, v.affine @ np.array([0, 0, 0, 1.0]))[2]))
    np.testing.assert_array_equal(v.data, vols["t1"].data[:, :, start : start + 6])
    assert crop_axial(vols, None, 100)[0] is vols  # no-op when asking for more than there is
    labels = np.zeros(seg.shape, dtype=np.float32)
    labels[10:12, 10:12, 11:13] = 1  # a lesion near the top: the slab follows it
    _, lseg = crop_axial(vols, Volume(labels, LPS), 6)
    assert lseg is not None and lseg.data.sum() == labels.sum()


def test_score_perfect_and_degraded_predictions(tmp_path):
    (case,) = find_cases(_write_case(tmp_path, "BraTS20_Training_001", 0))
    images, seg = load_case(case)
    ref = prepare_reference(case, images, seg, MODS, PreprocessConfig(image_size=32))
    assert ref.tumour is not None and ref.tumour.any() and ref.regions.shape[0] == 4
    perfect = Volume(ref.normalized["t2"].astype(np.float32), LPS)
    s = score(perfect, "t2", ref)
    assert s["paper_ssim"] == pytest.approx(1.0) and s["paper_psnr"] > 60 and s["mae"] < 1e-6
    assert s["brain_mean"] == pytest.approx(s["brain_mean_reference"]) and 0 < s["brain_mean"] < 1
    dimmer = score(Volume((0.5 * perfect.data).astype(np.float32), LPS), "t2", ref)
    assert dimmer["brain_mean"] == pytest.approx(0.5 * s["brain_mean_reference"], rel=1e-5)
    assert dimmer["brain_mean_reference"] == pytest.approx(s["brain_mean_reference"])
    # the BraSyn protocol re-normalises each volume on its own: the raw reference scores 1; the reference in the
    # model's [0, 1] scale does not (background and darkest tissue both map to 0): the protocol's ceiling
    raw = score(images["t2"], "t2", ref)
    assert raw["brasyn_ssim"] == pytest.approx(1.0) and raw["brasyn_ssim_tumour"] == pytest.approx(1.0)
    assert raw["brasyn_psnr"] == 100.0
    assert 0.5 < s["brasyn_ssim"] < 1.0
    rng = np.random.default_rng(0)
    noisy = Volume(np.clip(perfect.data + 0.1 * rng.standard_normal(perfect.shape) * ref.brain, 0, 1), LPS)
    worse = score(noisy, "t2", ref)
    assert worse["paper_ssim"] < 0.99 and 10 < worse["paper_psnr"] < 30 and worse["mae"] > 0.03
    assert worse["brasyn_ssim"] < s["brasyn_ssim"] and worse["brasyn_ssim_non_tumour"] < s["brasyn_ssim_non_tumour"]


def _oracle(noise: float) -> Method:
    """A fake synthesizer: the reference in model normalisation plus noise (stands in for a trained model)."""
    from model.metrics import normalize_in_mask

    def fn(study, targets, steps, seed):
        grid = next(iter(study.values()))
        return {t: Volume(np.clip(normalize_in_mask(_REF[t], _REF["brain"]) + noise * np.random.default_rng(seed)
                                  .standard_normal(grid.shape) * _REF["brain"], 0, 1).astype(np.float32), grid.affine)
                for t in targets}

    return Method("msgldm", fn)


_REF: dict[str, np.ndarray] = {}


def test_evaluate_cases_summary_markdown_and_figures(tmp_path):
    train = find_cases(_write_case(tmp_path, "BraTS20_Training_001", 0))
    (case,) = find_cases(_write_case(tmp_path, "BraTS20_Training_002", 1))
    images, _ = load_case(case)
    _REF.update({m: v.data for m, v in images.items()})
    _REF["brain"] = np.logical_or.reduce([v.data > 0 for v in images.values()])
    nearest = NearestModalityBaseline.fit(train, MODS)
    methods = [_oracle(0.0), baseline_method("nearest", nearest)]
    results = evaluate_cases([case], methods, MODS, PreprocessConfig(image_size=32), counts=[1, 3],
                             max_subsets=2, figures_dir=tmp_path / "figures")
    # 2 subsets of size 1 (3 targets each) + 2 of size 3 (1 target each) = 8 volumes per method
    assert len(results) == 16
    assert {r["method"] for r in results} == {"msgldm", "nearest"}
    by = {(r["method"], r["target"], tuple(r["available"])): r for r in results}
    for (m, t, avail), r in by.items():
        assert t not in avail and r["seconds"] >= 0 and 0 <= r["paper_ssim"] <= 1
        if m == "msgldm":  # the near-perfect fake beats copying another modality
            assert r["paper_ssim"] > by[("nearest", t, avail)]["paper_ssim"]
    summary = summarize(results)
    assert summary["msgldm"]["t1"]["all"]["paper_psnr"]["n"] >= 1
    assert set(summary["nearest"]["t1"]) <= {"1", "3", "all"}
    report = {"title": "test", "summary": summary, "cases": [case.id], "steps": 2, "seed": 0,
              "figures": {"t1": "figures/t1.png"}, "results": results}
    md = markdown_report(report)
    # per case at the largest M-bar: the cell is that case's volume, with its level against the reference's
    assert "## Per case (M̄ = 3)" in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {case.id} | MSG-LDM |"))
    r = next(r for r in results if r["method"] == "msgldm" and r["n_available"] == 3)
    assert f"{r['paper_psnr']:.2f} / {100 * r['paper_ssim']:.2f} / {r['brain_mean']:.2f} vs" in row
    assert row.count("|") == 7 and f"| {case.id} | Nearest modality |" in md
    assert "| M̄ | Method | T1 PSNR | T1 SSIM % |" in md and "| 3 | MSG-LDM |" in md
    assert "| all | Nearest modality |" in md
    assert "SSIM tumour %" in md and "![t1](figures/t1.png)" in md
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figs == ["flair.png", "t1.png", "t1ce.png", "t2.png"]
    assert (tmp_path / "figures" / "t1.png").stat().st_size < 300_000


def test_cli_on_a_random_tiny_checkpoint(tmp_path):
    from model.checkpoint import init_checkpoint
    from model.evaluate import main

    data = tmp_path / "data"
    _write_case(data, "BraTS20_Training_001", 0, shape=(56, 56, 12))  # enough brain in the tiny preset's 192 window
    _write_case(data, "BraTS20_Training_002", 1, shape=(56, 56, 12))
    ckpt = init_checkpoint("tiny", tmp_path / "ckpt")
    out = tmp_path / "eval"
    rc = main(["--checkpoint", str(ckpt), "--data", str(data), "--cases", "BraTS20_Training_002",
               "--out", str(out), "--steps", "2", "--max-slices", "11", "--available", "3", "--max-subsets", "1",
               "--baseline-steps", "2", "--baseline-views", "2"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["test_time_views"] == {"msgldm": 1, "unet": 2}  # the U-Net's views given, MSG-LDM's its config's
    assert "test-time views (model.slices.test_time_views): MSG-LDM 1, U-Net 2" in (out / "report.md").read_text()
    assert report["cases"] == ["BraTS20_Training_002"] and report["baseline_train_cases"] == ["BraTS20_Training_001"]
    assert {r["method"] for r in report["results"]} == {"msgldm", "nearest", "unet"}
    assert all(np.isfinite(r["paper_psnr"]) for r in report["results"])
    assert (out / "report.md").read_text().startswith("# Synthesis quality")
    assert (out / "baselines" / "unet" / "weights.safetensors").is_file()
    assert all("dice_mean" in r for r in report["results"])  # the case has labels: structure-model Dice
    assert set(report["ceiling"]) == {"t1", "t2", "t1ce", "flair"}
    assert set(report["autoencoder_ceiling"]) == {"t1", "t2", "t1ce", "flair"}  # the autoencoder's reconstruction
    assert "Autoencoder ceiling" in (out / "report.md").read_text()
    (target,) = {r["target"] for r in report["results"]}  # one subset of 3 inputs: one target
    assert [p.name for p in (out / "figures").glob("*.png")] == [f"{target}.png"]
    # pooling folds: results concatenated and tagged, summary recomputed
    assert main(["merge", str(out / "report.json"), str(out / "report.json"), "--out", str(tmp_path / "pooled")]) == 0
    pooled = json.loads((tmp_path / "pooled" / "report.json").read_text())
    assert len(pooled["results"]) == 2 * len(report["results"]) and {r["fold"] for r in pooled["results"]} == {0, 1}
    n = pooled["summary"]["nearest"][target]["all"]["paper_psnr"]["n"]
    assert n == 2 * report["summary"]["nearest"][target]["all"]["paper_psnr"]["n"]
    assert "| all | Regression U-Net |" in (tmp_path / "pooled" / "report.md").read_text()
    assert pooled["autoencoder_ceiling"].keys() == report["autoencoder_ceiling"].keys()
    assert pooled["test_time_views"] == report["test_time_views"]


def test_cases_off_one_grid_are_skipped(tmp_path, caplog):
    for mod, shape in (("T1", (24, 24, 12)), ("T2", (20, 24, 12))):
        path = tmp_path / f"IXI002-Guys-0828-{mod}.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), str(path))
    (case,) = find_cases(tmp_path)

    def never(study, targets, steps, seed):
        raise AssertionError("a case without one grid must not be synthesized")

    results = evaluate_cases([case], [Method("msgldm", never)], ("t1", "t2"), PreprocessConfig(image_size=32))
    assert results == [] and "IXI002-Guys-0828 skipped" in caplog.text and "t2" in caplog.text


def test_recorded_split_is_read_from_the_checkpoint(tmp_path):
    from model.evaluate import recorded_split

    assert recorded_split(tmp_path) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"split": {"train": ["a", "b"], "val": ["c"], "seed": 0}}))
    assert recorded_split(tmp_path) == {"train": ["a", "b"], "val": ["c"]}
    (tmp_path / "metrics.json").write_text("{}")
    assert recorded_split(tmp_path) is None


def test_input_dependence_figure_needs_two_subsets_and_draws_one_panel_per_target(tmp_path):
    from model.figures import input_dependence_figure

    rows = [{"target": t, "method": m, "available": list(a), "paper_psnr": 20.0 + len(a) + (m == "msgldm")}
            for t in ("t1", "flair") for m in ("msgldm", "nearest") for a in (("t2",), ("t2", "t1ce"))
            if t not in a]
    path = input_dependence_figure(rows, tmp_path / "dep.png")
    assert path is not None and path.stat().st_size > 5000
    one = [r for r in rows if r["available"] == ["t2"]]
    assert input_dependence_figure(one, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    # one subset per target (3 inputs -> each target) is no input dependence either
    per_target = [{**r, "available": [m for m in ("t1", "t2", "t1ce", "flair") if m != r["target"]]} for r in one]
    assert input_dependence_figure(per_target, tmp_path / "none.png") is None
