"""Baselines: histogram matching, nearest-modality choice, regression U-Net training/saving (tiny, 1 thread)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model.baselines import (
    BaselineError,
    NearestModalityBaseline,
    RegressionUNet,
    RegressionUNetBaseline,
    RegressionUNetConfig,
    brain_mask,
    histogram_match,
    train_regression_unet,
)
from model.data import find_cases
from model.io.volume import Volume
from model.metrics import normalize_in_mask

MODS = ("t1", "t2", "t1ce", "flair")


def _phantom(shape=(24, 24, 12), seed=0) -> dict[str, np.ndarray]:
    """A sphere 'brain' with a structure; t1ce is t1 plus a spot, t2 is inverted t1, flair is t2 squared."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((g**2).sum(0))
    brain = r < 0.9
    tissue = 0.5 + 0.4 * np.sin(4 * g[0]) * np.cos(3 * g[1]) + 0.02 * rng.standard_normal(shape)
    t1 = np.where(brain, 100 + 200 * tissue, 0)
    t2 = np.where(brain, 100 + 200 * (1 - tissue), 0)
    t1ce = t1 + np.where(brain & (r < 0.3), 150, 0)
    flair = np.where(brain, t2**2 / 300, 0)
    return {"t1": t1, "t2": t2, "t1ce": t1ce, "flair": flair}


def _write_case(root: Path, case_id: str, seed: int) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    names = {"t1": "t1", "t2": "t2", "t1ce": "t1ce", "flair": "flair"}
    for mod, arr in _phantom(seed=seed).items():
        nib.save(nib.Nifti1Image(arr.astype(np.float32), np.eye(4)), str(folder / f"{case_id}_{names[mod]}.nii.gz"))
    return folder


def test_histogram_match_follows_the_target_distribution():
    rng = np.random.default_rng(0)
    src = rng.random(5000) ** 3  # skewed
    levels = np.linspace(0, 1, 1001)
    target_q = np.quantile(rng.normal(0.5, 0.1, 20000), levels)
    out = histogram_match(src, target_q, levels)
    assert abs(out.mean() - 0.5) < 0.01 and abs(out.std() - 0.1) < 0.01
    assert np.all(np.diff(out[np.argsort(src)]) >= -1e-12)  # monotone: order kept
    ties = histogram_match(np.array([1.0, 1.0, 2.0, 2.0]), target_q, levels)
    assert ties[0] == ties[1] and ties[2] == ties[3] and ties[0] < ties[2]


def test_nearest_modality_fit_choice_and_synthesis(tmp_path):
    folders = [_write_case(tmp_path, "BraTS20_Training_001", 0), _write_case(tmp_path, "BraTS20_Training_002", 1)]
    cases = find_cases(folders)
    nb = NearestModalityBaseline.fit(cases, MODS)
    c = nb.correlation
    assert c.shape == (4, 4) and np.allclose(np.diag(c), 1) and np.allclose(c, c.T)
    assert c[0, 2] > 0.8 and c[0, 1] < -0.9  # t1 ~ t1ce, t1 ~ inverted t2
    assert nb.source_for("t1", ["t2", "t1ce"]) == "t1ce"
    assert nb.source_for("flair", ["t1", "t2"]) == "t2"
    with pytest.raises(BaselineError, match="no available modality"):
        nb.source_for("t1", ["t1"])

    vols = {m: Volume(a.astype(np.float32), np.eye(4)) for m, a in _phantom(seed=5).items()}
    out = nb.synthesize({"t1ce": vols["t1ce"], "flair": vols["flair"]}, ["t1"])["t1"]
    assert out.meta["source_modality"] == "t1ce" and out.shape == vols["t1"].shape
    mask = brain_mask([vols["t1ce"], vols["flair"]])
    assert out.data.min() >= 0 and out.data.max() <= 1 and np.all(out.data[~mask] == 0)
    ref = normalize_in_mask(vols["t1"].data, mask)
    assert np.corrcoef(out.data[mask], ref[mask])[0, 1] > 0.8

    nb.save(tmp_path / "nb")
    again = NearestModalityBaseline.load(tmp_path / "nb")
    assert again.modalities == nb.modalities and np.allclose(again.quantiles, nb.quantiles)
    with pytest.raises(BaselineError, match="not on the grid"):
        nb.synthesize({"t1ce": vols["t1ce"], "flair": Volume(vols["flair"].data, np.diag([2, 1, 1, 1.0]))}, ["t1"])


def test_regression_unet_shapes_and_missing_inputs_are_ignored():
    cfg = RegressionUNetConfig(modalities=MODS, channels=(4, 8, 8, 16))
    torch.manual_seed(0)
    net = RegressionUNet(cfg).eval()
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[True, False, True, False], [True, True, True, False]])
    with torch.no_grad():
        y = net(x, avail)
        x2 = x.clone()
        x2[0, 1] = 5.0  # a missing modality's values must not matter
        y2 = net(x2, avail)
    assert y.shape == (2, 4, 32, 32) and y.abs().max() <= 1
    assert torch.allclose(y[0], y2[0])


def test_regression_unet_training_is_deterministic_and_learns(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random((6, 1, 32, 32)).astype(np.float32)
    x = np.concatenate([base, 1 - base, base, base**2], axis=1) * 2 - 1  # modalities are functions of each other
    cfg = RegressionUNetConfig(modalities=MODS, channels=(4, 8, 8, 16), steps=20, batch_size=2, lr=2e-3, seed=3,
                               train_crop=16)  # random crops: deterministic too
    losses_a: list[float] = []
    net_a = train_regression_unet(x, cfg, lambda s, loss: losses_a.append(loss))
    losses_b: list[float] = []
    net_b = train_regression_unet(x, cfg, lambda s, loss: losses_b.append(loss))
    assert losses_a == losses_b  # same seed, same run
    assert np.mean(losses_a[-5:]) < np.mean(losses_a[:5])
    for (ka, va), (_, vb) in zip(net_a.state_dict().items(), net_b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    with pytest.raises(BaselineError, match="training slices"):
        train_regression_unet(x[:, :3], cfg)

    baseline = RegressionUNetBaseline(cfg, net_a, {"steps": 20})
    baseline.save(tmp_path / "unet")
    loaded = RegressionUNetBaseline.load(tmp_path / "unet")
    assert loaded.cfg == cfg and loaded.record == {"steps": 20}
    avail = [True, False, False, True]
    np.testing.assert_allclose(loaded.predict_slices(x[:2], avail), baseline.predict_slices(x[:2], avail), atol=1e-6)
    with pytest.raises(BaselineError, match="not a regression U-Net"):
        RegressionUNetBaseline.load(tmp_path)


def test_regression_unet_baseline_end_to_end_on_volumes(tmp_path):
    from model.config import PreprocessConfig

    cases = find_cases([_write_case(tmp_path, "BraTS20_Training_001", 0)])
    pcfg = PreprocessConfig(image_size=32)
    cfg = RegressionUNetConfig(modalities=MODS, channels=(4, 8, 8, 16), steps=3, batch_size=2,
                               preprocess={"image_size": 32})
    baseline = RegressionUNetBaseline.train(cases, cfg)
    assert baseline.record["slices"] > 0 and baseline.cfg.preprocess["image_size"] == pcfg.image_size
    vols = {m: Volume(a.astype(np.float32), np.eye(4)) for m, a in _phantom(seed=2).items()}
    out = baseline.synthesize({"t1": vols["t1"], "t2": vols["t2"]}, ["t1ce", "flair"])
    assert set(out) == {"t1ce", "flair"}
    for v in out.values():
        assert v.shape == vols["t1"].shape and np.allclose(v.affine, np.eye(4))
        assert v.data.min() >= 0 and v.data.max() <= 1
    # with the mirror view averaged in (model.evaluate gives it MSG-LDM's test-time views), a study mirrored
    # left-right (RAS x) gives the mirrored synthesis, which one view alone does not
    from dataclasses import replace

    study = {"t1": vols["t1"], "t2": vols["t2"]}
    mirrored = {m: Volume(np.flip(v.data, 0).copy(), v.affine) for m, v in study.items()}
    for views, equivariant in ((((False, 0), (True, 0)), True), (((False, 0),), False)):
        b = replace(baseline, views=views)
        a, m = b.synthesize(study, ["flair"])["flair"].data, b.synthesize(mirrored, ["flair"])["flair"].data
        assert np.allclose(a, np.flip(m, 0), atol=1e-5) == equivariant
