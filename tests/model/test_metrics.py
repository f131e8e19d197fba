"""Metrics against hand-computed values and known properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import (
    dice,
    dice_regions,
    mae,
    mse,
    normalize_in_mask,
    percentile_normalize,
    psnr,
    psnr_slices,
    ssim,
    ssim_3d,
    ssim_slices,
)

from .conftest import DATA


def _explicit_center_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM at the centre of an image exactly one window (11^d) wide, from the definition."""
    g = np.exp(-0.5 * (np.arange(11) - 5) ** 2 / 1.5**2)
    g /= g.sum()
    w = g
    for _ in range(x.ndim - 1):
        w = np.multiply.outer(w, g)
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_psnr_mse_mae_hand_values():
    x = np.zeros((4, 4))
    y = np.full((4, 4), 0.1)
    assert mse(x, y) == pytest.approx(0.01)
    assert mae(x, y) == pytest.approx(0.1)
    assert psnr(x, y) == pytest.approx(20.0)
    assert psnr(x, y, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(x, x) == math.inf


def test_masked_variants_only_see_the_mask():
    x = np.zeros((4, 4))
    y = np.zeros((4, 4))
    y[:2] = 0.5  # errors only in the top half
    bottom = np.zeros((4, 4), dtype=bool)
    bottom[2:] = True
    assert mae(x, y, bottom) == 0 and psnr(x, y, mask=bottom) == math.inf
    assert mae(x, y, ~bottom) == pytest.approx(0.5)
    assert psnr(x, y, mask=~bottom) == pytest.approx(10 * math.log10(1 / 0.25))
    assert math.isnan(mae(x, y, np.zeros((4, 4), dtype=bool)))
    with pytest.raises(ValueError, match="mask shape"):
        mae(x, y, np.ones((3, 3), dtype=bool))


@pytest.mark.parametrize("ndim", [2, 3])
def test_ssim_matches_the_definition(ndim):
    rng = np.random.default_rng(ndim)
    x = rng.random((11,) * ndim)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    # an 11-wide image has one uncropped voxel: the centre, whose window is the whole image
    assert ssim(x, y) == pytest.approx(_explicit_center_ssim(x, y), rel=1e-9)
    assert ssim(x, y, data_range=2.0) == pytest.approx(_explicit_center_ssim(x, y, 2.0), rel=1e-9)


def test_ssim_properties():
    rng = np.random.default_rng(0)
    x = gaussian_blob((32, 32))
    assert ssim(x, x) == pytest.approx(1.0)
    a = ssim(x, np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1))
    b = ssim(x, np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1))
    assert 1.0 > a > b > 0.0  # more noise, lower SSIM
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(x, y) == pytest.approx(ssim(y, x))  # symmetric
    assert ssim(x, x + 0.3) < 1.0  # a brightness shift is penalised
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(np.zeros((12, 12)), np.zeros((12, 13)))


def test_masked_ssim_averages_the_map_over_the_mask():
    rng = np.random.default_rng(1)
    x = rng.random((24, 24))
    y = x.copy()
    y[12:] = rng.random((12, 24))  # bottom half replaced
    top = np.zeros_like(x, dtype=bool)
    top[:7] = True  # windows centred in rows 5..6 see only identical rows
    assert ssim(x, y, mask=top) == pytest.approx(1.0)
    assert ssim(x, y, mask=~top) < ssim(x, y, mask=top)


def test_ssim_3d_and_slices():
    rng = np.random.default_rng(2)
    vol = gaussian_blob((12, 16, 16))
    noisy = np.clip(vol + 0.1 * rng.standard_normal(vol.shape), 0, 1)
    assert ssim_3d(vol, vol) == pytest.approx(1.0)
    assert 0 < ssim_3d(vol, noisy) < 1
    with pytest.raises(ValueError, match="3D"):
        ssim_3d(vol[0], vol[0])
    per_slice = ssim_slices(vol, noisy, axis=0)
    assert per_slice.shape == (12,)
    assert per_slice[3] == pytest.approx(ssim(vol[3], noisy[3]))
    along_last = ssim_slices(vol[:, :, :12], noisy[:, :, :12], axis=2)
    assert along_last[4] == pytest.approx(ssim(vol[:, :, 4], noisy[:, :, 4]))
    p = psnr_slices(vol, noisy)
    assert p.shape == (12,) and p[5] == pytest.approx(psnr(vol[5], noisy[5]))
    assert np.all(np.isinf(psnr_slices(vol, vol)))


def test_dice_hand_values():
    a = np.array([1, 1, 0, 0], dtype=bool)
    b = np.array([1, 0, 1, 0], dtype=bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert dice(a, ~a) == 0.0
    ref = np.stack([~a, a, a, np.zeros(4, bool)])
    pred = np.stack([~b, b, a, np.zeros(4, bool)])
    out = dice_regions(pred, ref)
    assert out == {"WT": 0.5, "TC": 1.0, "ET": 1.0, "mean": pytest.approx(2.5 / 3)}


def test_percentile_normalize():
    x = np.arange(1000, dtype=float)
    x[0] = -50.0  # negative values are clipped at 0 (BraSyn lower bound)
    x[-1] = 1e6  # a hot voxel does not set the scale
    n = percentile_normalize(x)
    assert n.min() == 0.0 and n.max() == 1.0
    assert n[500] == pytest.approx((500 - np.percentile(x, 0.5)) / (np.percentile(x, 99.5) - np.percentile(x, 0.5)))
    assert np.all(percentile_normalize(np.full(10, 3.0)) == 0)


def gaussian_blob(shape: tuple[int, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return np.exp(-sum(g**2 for g in grids) * 2.0)


BOXES = [(slice(10, 25), slice(5, 40), slice(8, 20)), (slice(0, 30), slice(3, 10), slice(0, 5))]


@pytest.mark.parametrize("where", BOXES)
def test_ssim_background_skip_is_exact(where):
    """The bounding-box fast path equals the full map's cropped mean (zero background, both images)."""
    from model.metrics import _crop, ssim_map

    rng = np.random.default_rng(4)
    x, y = np.zeros((40, 45, 30)), np.zeros((40, 45, 30))
    x[where] = rng.random(x[where].shape)
    y[where] = np.clip(x[where] + 0.2 * rng.standard_normal(x[where].shape), 0, 1)
    axes = (0, 1, 2)
    full = _crop(ssim_map(x, y, 1.0, axes=axes), axes).mean()
    assert ssim(x, y) == pytest.approx(full, abs=1e-12)
    assert ssim(np.zeros((12, 12)), np.zeros((12, 12))) == 1.0


def test_ssim_in_masks_matches_masked_ssim():
    from model.metrics import ssim_in_masks

    rng = np.random.default_rng(5)
    x = rng.random((20, 22, 16))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    inner = np.zeros(x.shape, dtype=bool)
    inner[8:12, 9:13, 6:10] = True
    out = ssim_in_masks(x, y, {"in": inner, "out": ~inner, "none": np.zeros(x.shape, bool)})
    assert out["in"] == pytest.approx(ssim(x, y, mask=inner)) and out["out"] == pytest.approx(ssim(x, y, mask=~inner))
    assert np.isnan(out["none"])


@pytest.mark.skipif(not (DATA / "tcga_du_7294_preprocessed").is_dir(), reason="../shared/data is absent")
def test_psnr_and_ssim_equal_scikit_images_on_real_volumes():
    """Cross-check against scikit-image (Gaussian window, sigma 1.5, population covariance: Wang et al. 2004)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from model.io.nifti import read_nifti

    folder = DATA / "tcga_du_7294_preprocessed"
    t1, t2 = (read_nifti(folder / f"TCGA-DU-7294_{m}.nii.gz").data for m in ("t1", "t2"))
    mask = (t1 > 0) | (t2 > 0)
    a, b = (normalize_in_mask(v, mask) for v in (t1, t2))
    a, b = a[40:200, 40:200, 60:100], b[40:200, 40:200, 60:100]  # a 160x160x40 block through the brain
    kw = {"data_range": 1.0, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-3)
    assert ssim(a, b) == pytest.approx(structural_similarity(a, b, **kw), abs=1e-3)
    per_slice = ssim_slices(a, b, axis=2)
    for z in (0, 17, 39):
        assert per_slice[z] == pytest.approx(structural_similarity(a[..., z], b[..., z], **kw), abs=1e-3)
        assert psnr_slices(a, b, axis=2)[z] == pytest.approx(
            peak_signal_noise_ratio(b[..., z], a[..., z], data_range=1.0), abs=1e-3)
