"""Stage 1 structure model: shape tables and the properties the paper's design relies on."""

from __future__ import annotations

import pytest
import torch

from model.structure import (
    HFIB,
    MMSF,
    MSSE,
    ReconstructionDecoder,
    SegmentationDecoder,
    StructureEncoder,
    StructureModel,
    StyleEncoder,
)

from .conftest import micro_config

CH = (4, 8, 16, 32)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_structure_encoder_shapes(size, fusion):
    feats = StructureEncoder(1, CH, hfib_fusion=fusion)(torch.randn(2, 1, size, size))
    assert [tuple(f.shape) for f in feats] == [(2, c, size // 2**i, size // 2**i) for i, c in enumerate(CH)]


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_hfib_high_frequency_is_zero_on_constant_image(fusion):
    hfib = HFIB(3, fusion, sigma_init=0.7)
    const = torch.full((2, 3, 16, 16), 2.5)
    assert (
        torch.equal(hfib.high_frequency(const).abs().amax(), torch.tensor(0.0))
        or hfib.high_frequency(const).abs().max() < 1e-6
    )
    edge = torch.zeros(1, 3, 16, 16)
    edge[..., 8:] = 1.0
    high = hfib.high_frequency(edge)
    assert high[..., 7:9].abs().min() > 0.05  # edges survive
    assert high[..., :6].abs().max() < 1e-6 and high[..., 10:].abs().max() < 1e-6  # flat parts do not
    if fusion == "add":
        assert torch.allclose(hfib(edge), edge + high)  # paper Eq. 2


def test_hfib_kernel_is_normalised_and_sigma_is_learnable():
    hfib = HFIB(2, "add", sigma_init=1.0)
    k = hfib.kernel()
    assert k.shape == (2, 1, 3, 3) and torch.allclose(k.sum((1, 2, 3)), torch.ones(2))
    x = torch.randn(1, 2, 8, 8)
    hfib(x).pow(2).sum().backward()
    assert hfib.sigma.grad is not None and hfib.sigma.grad.abs() > 0
    hfib.sigma.data.fill_(-5.0)  # clamped, still a valid kernel
    assert torch.isfinite(hfib.kernel()).all()


def test_mmsf_gates_lie_in_unit_interval():
    mmsf = MMSF(3, 8)
    feats = [torch.randn(2, 8, 12, 12) * 50 for _ in range(3)]
    fused, gates = mmsf(feats)
    assert fused.shape == (2, 8, 12, 12) and gates.shape == (2, 3, 12, 12)
    assert gates.min() >= 0 and gates.max() <= 1


def test_msse_shape_and_alpha():
    msse = MSSE(CH, heads=4, alpha_init=0.5, alpha_learnable=True)
    fused = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(CH)]
    f_s = msse(fused)
    assert f_s.shape == (2, 32, 4, 4)
    assert isinstance(msse.alpha, torch.nn.Parameter) and msse.alpha.item() == 0.5
    msse.alpha.data.zero_()
    assert torch.allclose(msse(fused), fused[-1])  # F_s = F_L + alpha * Attn
    fixed = MSSE(CH, alpha_learnable=False)
    assert not isinstance(fixed.alpha, torch.nn.Parameter)


def test_msse_area_resize_averages_every_pixel_of_each_block():
    """Bilinear 32 -> 4 (align_corners False) reads 2x2 of each 8x8 block; the area resize reads all of them."""
    reads = {}
    for resize in ("bilinear", "area"):
        msse = MSSE(CH, resize=resize)
        probe = torch.zeros(1, CH[0], 32, 32, requires_grad=True)
        msse._resize(probe, (4, 4)).sum().backward()
        reads[resize] = (probe.grad != 0).float().mean().item()
    assert reads["bilinear"] == pytest.approx(4 / 64) and reads["area"] == 1.0
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(MSSE(CH, resize="area")._resize(x, (4, 4)), x.reshape(1, 1, 4, 8, 4, 8).mean((3, 5)))


def test_cached_modality_features_fuse_to_the_same_f_s_for_any_subset():
    """Stage 2's F_s cache: per-modality features once, fused per subset == encode_structure on that subset."""
    from model.config import StructureConfig

    torch.manual_seed(0)
    sm = StructureModel(StructureConfig(channels=CH, dropout=0.0, msse_heads=4), 4).eval()
    x = torch.randn(2, 4, 32, 32)
    feats = sm.modality_features(x, torch.ones(2, 4, dtype=torch.bool))
    for subset in ([[1, 0, 0, 0], [0, 1, 1, 1]], [[1, 1, 1, 1], [0, 0, 1, 0]]):
        avail = torch.tensor(subset, dtype=torch.bool)
        with torch.no_grad():
            assert torch.allclose(sm.fuse(feats, avail)["f_s"], sm.encode_structure(x, avail)["f_s"], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_style_encoder_works_on_single_samples_in_train_mode(batch):
    enc = StyleEncoder(1, 4, 4, 8).train()  # the authors' version raises here (InstanceNorm on 1x1)
    assert enc(torch.randn(batch, 1, 32, 32)).shape == (batch, 8)


def test_reconstruction_and_segmentation_decoders():
    dec = ReconstructionDecoder(CH, style_dim=8, res_blocks=2, mlp_channels=16)
    img, mu, sigma = dec(torch.randn(2, 32, 4, 4), torch.randn(2, 8))
    assert img.shape == (2, 1, 32, 32) and img.abs().max() <= 1
    assert mu.shape == sigma.shape == (2, 2, 2, 32) and (sigma > 0).all()
    seg = SegmentationDecoder(CH, 4)([torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(CH)])
    assert seg.shape == (2, 4, 32, 32)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("size", [32, 64])
def test_structure_model_shape_table(m, size):
    cfg = micro_config()
    model = StructureModel(cfg.structure, m)
    x = torch.randn(2, m, size, size)
    available = torch.ones(2, m, dtype=torch.bool)
    available[0, 0] = False
    out = model(x, available)
    lat = size // 8
    assert out["f_s"].shape == (2, 32, lat, lat)
    assert [tuple(f.shape) for f in out["fused"]] == [(2, c, size // 2**i, size // 2**i) for i, c in enumerate(CH)]
    assert out["styles"].shape == (2, m, 8)
    assert out["recon"].shape == (2, m, size, size)
    assert out["seg_logits"].shape == (2, 4, size, size)


@pytest.mark.parametrize("mmsf", [True, False])
def test_structure_ignores_the_values_of_missing_modalities(mmsf):
    torch.manual_seed(0)
    cfg = micro_config(**{"structure.mmsf": mmsf})
    model = StructureModel(cfg.structure, 4).eval()
    x = torch.randn(3, 4, 32, 32)
    available = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    ref = model.encode_structure(x, available)
    x2 = x.clone()
    x2[~available] = torch.randn_like(x2[~available]) * 10 + 3  # change only the missing inputs
    out = model.encode_structure(x2, available)
    assert torch.equal(out["f_s"], ref["f_s"])
    for a, b in zip(out["fused"], ref["fused"], strict=True):
        assert torch.equal(a, b)
    x3 = x.clone()
    x3[0, 0] += 1.0  # an available input does matter
    assert not torch.allclose(model.encode_structure(x3, available)["f_s"][0], ref["f_s"][0])


def test_temperature_is_learnable_and_clamped():
    model = StructureModel(micro_config().structure, 2)
    assert model.log_tau.requires_grad
    model.log_tau.data.fill_(20.0)
    assert model.tau.item() == pytest.approx(100.0, rel=1e-5)
