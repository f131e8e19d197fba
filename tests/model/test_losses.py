"""Losses against hand computations and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.fft import dctn

from model.losses import (
    adain_kl,
    dct2,
    dct_ssim_loss,
    hinge_d_loss,
    segmentation_loss,
    ssim,
    structure_aware_loss,
    style_consistency_loss,
)

from .conftest import BRATS2018, requires_data


def _log_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(-v))


def test_style_consistency_equals_hand_computation():
    # B = 2 samples, M = 2 modalities, D = 2; stacked order p = (b, j): s(0,0), s(0,1), s(1,0), s(1,1)
    styles = torch.tensor([[[3.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [-1.0, 1.0]]])
    tau = 2.0
    vecs = [(1, 0), (0, 1), (1 / math.sqrt(2), 1 / math.sqrt(2)), (-1 / math.sqrt(2), 1 / math.sqrt(2))]
    mods = [0, 1, 0, 1]
    total = 0.0
    for p in range(4):
        for q in range(4):
            z = tau * (vecs[p][0] * vecs[q][0] + vecs[p][1] * vecs[q][1])
            t = 1.0 if mods[p] == mods[q] else 0.0
            total += t * _log_sigmoid(z) + (1 - t) * _log_sigmoid(-z)
    expected = -total / 16
    got = style_consistency_loss(styles, torch.tensor(tau))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_style_consistency_prefers_modality_clusters_and_grads_reach_tau():
    clustered = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.9, 0.1], [0.1, 0.9]]])
    mixed = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.1, 0.9], [0.9, 0.1]]])
    tau = torch.tensor(5.0, requires_grad=True)
    good = style_consistency_loss(clustered, tau)
    assert good < style_consistency_loss(mixed, tau)
    good.backward()
    assert tau.grad is not None and tau.grad != 0


def test_style_consistency_drops_invalid_codes():
    styles = torch.randn(2, 3, 8)
    valid = torch.tensor([[True, False, True], [True, True, False]])
    kept = styles[valid].reshape(1, 4, 8)  # row-major (b, j) order of the valid ones: mods 0,2,0,1
    loss = style_consistency_loss(styles, 3.0, valid)
    s = F.normalize(kept[0], dim=-1)
    mods = torch.tensor([0, 2, 0, 1])
    target = (mods[:, None] == mods[None]).float()
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(3.0 * s @ s.t(), target).item(), rel=1e-6)


def test_dct_is_scipys_orthonormal_dct2():
    x = np.random.default_rng(0).normal(size=(2, 1, 12, 16)).astype(np.float32)
    ours = dct2(torch.from_numpy(x)).numpy()
    assert np.allclose(ours, dctn(x, type=2, norm="ortho", axes=(-2, -1)), atol=1e-4)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-7, 8, dtype=torch.float32)
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (7, 7, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, 7, 7), mode="reflect"), g.view(1, 1, -1, 1))


def test_dct_ssim_loss_is_zero_for_identical_images_and_grows_with_blur():
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    img = ((xx**2 + yy**2) < 0.6).float() - 0.5 * ((xx - 0.2).abs() < 0.1).float()
    img = (img + 0.1 * torch.randn(48, 48, generator=gen))[None, None]
    assert dct_ssim_loss(img, img).item() == pytest.approx(0.0, abs=1e-5)
    losses = [dct_ssim_loss(_blur(img, s), img).item() for s in (0.5, 1.0, 2.0, 4.0)]
    assert losses[0] > 1e-3
    assert all(a < b for a, b in zip(losses, losses[1:], strict=False)), losses
    assert structure_aware_loss(img, img).item() == pytest.approx(0.0, abs=1e-5)


def test_ssim_properties():
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(ssim(x, x, 1.0), torch.ones(2), atol=1e-5)
    assert (ssim(x, x + 0.3 * torch.randn_like(x), 1.0) < 0.9).all()


def test_segmentation_loss():
    target = torch.zeros(1, 4, 8, 8)
    target[:, 0] = 1
    target[:, 1, 2:5, 2:5] = 1
    perfect = (target * 2 - 1) * 20
    assert segmentation_loss(perfect, target).item() < 1e-3
    assert segmentation_loss(-perfect, target).item() > 1.5


def test_region_dice_charges_a_segmentation_that_misses_the_tumour():
    """Predicting background everywhere: the pooled Dice (background included) barely notices, the per-region
    Dice is as bad as it gets; both are ~0 for a perfect prediction."""
    target = torch.zeros(2, 4, 32, 32)
    target[:, 1:, 10:16, 10:16] = 1  # a 6x6 tumour in every region
    target[:, 0] = 1 - target[:, 1]
    perfect, empty = (target * 2 - 1) * 20, torch.full_like(target, -20.0)
    empty[:, 0] = 20.0
    dice_only = {"bce_weight": 0.0}
    assert segmentation_loss(perfect, target, dice="regions", **dice_only).item() < 1e-3
    assert segmentation_loss(empty, target, **dice_only).item() < 0.2  # pooled: 0.07 (the background is 97 %)
    assert segmentation_loss(empty, target, dice="regions", **dice_only).item() > 0.99


def test_kl_and_gan_losses():
    assert adain_kl(torch.zeros(3, 5), torch.ones(3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    assert adain_kl(torch.ones(3, 5), torch.ones(3, 5)).item() == pytest.approx(0.5)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0


@requires_data(BRATS2018)
def test_log_amplitude_dct_term_sees_blur_and_a_wrong_modality_on_real_slices():
    """The authors' DCT-SSIM is dominated by the DC coefficient; on log amplitudes blur and a wrong contrast show."""
    from scipy.ndimage import gaussian_filter

    from model.config import load_preset
    from model.data import find_cases
    from model.slices import SliceDataset

    ds = SliceDataset(find_cases([BRATS2018 / "Brats18_2013_3_1"]), load_preset("cpu"))
    x = ds.x[len(ds) // 2].float()  # t1, t2, t1ce, flair
    flair = x[3:4][None]
    blur2 = torch.from_numpy(gaussian_filter(flair.numpy(), sigma=(0, 0, 2, 2))).float()
    old = {"blur": dct_ssim_loss(blur2, flair), "t1": dct_ssim_loss(x[0:1][None], flair)}
    new = {
        "blur": dct_ssim_loss(blur2, flair, "log_amplitude"),
        "t1": dct_ssim_loss(x[0:1][None], flair, "log_amplitude"),
    }
    assert max(v.item() for v in old.values()) < 0.01  # the measured defect: inert
    assert min(v.item() for v in new.values()) > 0.1  # now the structural term weighs in
    assert dct_ssim_loss(flair, flair, "log_amplitude").item() == pytest.approx(0.0, abs=1e-5)
    assert structure_aware_loss(blur2, flair, "log_amplitude") > structure_aware_loss(blur2, flair) + 0.1


def test_ssim_and_dct_stay_float32_under_bf16_autocast():
    """bf16 cannot resolve the variances (E[x^2] - mu^2): under autocast SSIM must equal its float32 value."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 48, 48, generator=gen), torch.rand(2, 1, 48, 48, generator=gen)
    ref = ssim(a, b, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(a, b, 1.0)
        d = dct2(a)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-6)
    assert d.dtype == torch.float32
