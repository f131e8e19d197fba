"""The assembled model: training losses run, sampling is seeded, and a tiny model overfits real slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.msgldm import MSGLDM
from model.preprocess import prepare_study

from .conftest import BRATS, micro_config, requires_data


def test_latent_round_trip_shapes_and_channel_blocks(micro_cfg):
    model = MSGLDM(micro_cfg).eval()
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    z = model.encode_latents(x)
    assert z.shape == (2, 16, 4, 4)
    single, _ = model.autoencoder.encode(x[:, 2:3])
    assert torch.allclose(z[:, 8:12], single, atol=1e-5)  # modality j owns channels 4j..4j+3
    only = model.encode_latents(x, [0, 2])  # inference encodes the available modalities alone
    assert torch.allclose(only[:, 0:4], z[:, 0:4], atol=1e-5) and torch.allclose(only[:, 8:12], z[:, 8:12], atol=1e-5)
    assert (only[:, 4:8] == 0).all() and (only[:, 12:16] == 0).all()
    assert model.decode_latents(z, [1, 3]).shape == (2, 2, 32, 32)
    assert (
        model.latent_mask(torch.tensor([[True, False, False, True]]))[0, :, 0, 0].tolist()
        == [1.0] * 4 + [0.0] * 8 + [1.0] * 4
    )


def test_sample_prediction_regresses_the_clean_latent():
    torch.manual_seed(0)
    model = MSGLDM(micro_config(**{"diffusion.prediction": "sample"}))
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        z0 = model.encode_latents(x)
    # the zero-initialised UNet predicts 0, so the loss is the latents' mean square (not the noise's, ~1)
    loss = model.diffusion_training_loss(x, avail, torch.Generator().manual_seed(0), z0=z0)
    assert loss.item() == pytest.approx(z0.pow(2).mean().item(), rel=1e-5)


def test_missing_modalities_weigh_missing_weight_times_more_in_the_diffusion_loss():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    model = MSGLDM(micro_config(**{"diffusion.prediction": "sample"}))
    z0 = model.encode_latents(x).detach()
    # the zero-initialised UNet predicts 0: the loss is a weighted mean of z0^2
    w = model.latent_mask(avail) + 3.0 * (1 - model.latent_mask(avail))
    expected = (z0.pow(2) * w).sum() / w.expand_as(z0).sum()
    weighted = MSGLDM(micro_config(**{"diffusion.prediction": "sample", "diffusion.missing_weight": 3.0}))
    weighted.load_state_dict(model.state_dict())
    got = weighted.diffusion_training_loss(x, avail, torch.Generator().manual_seed(0), z0=z0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(z0.pow(2).mean().item(), rel=1e-3)


def test_diffusion_loss_backpropagates_into_the_unet_only(micro_cfg):
    model = MSGLDM(micro_cfg)
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    loss = model.diffusion_training_loss(
        x, torch.tensor([[1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool), torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in model.structure.parameters())
    assert any(p.grad is not None for p in model.unet.parameters())


@pytest.mark.parametrize("eta,prediction", [(0.0, "epsilon"), (1.0, "epsilon"), (0.0, "sample")])
def test_sampling_is_deterministic_for_a_seed(eta, prediction):
    torch.manual_seed(0)
    model = MSGLDM(micro_config(**{"diffusion.prediction": prediction})).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)  # a non-trivial denoiser
    x = torch.rand(3, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    a = model.sample(x, avail, steps=4, seed=7, eta=eta)
    b = model.sample(x, avail, steps=4, seed=7, eta=eta)
    c = model.sample(x, avail, steps=4, seed=8, eta=eta)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # decoding only some targets (the gates' use) returns those modalities of the same sample
    part = model.sample(x, avail, steps=4, seed=7, eta=eta, targets=[3, 2])
    assert part.shape == (3, 2, 32, 32) and torch.allclose(part, a[:, [3, 2]], atol=1e-5)


def test_chunking_does_not_change_the_result(micro_cfg):
    torch.manual_seed(0)
    model = MSGLDM(micro_cfg).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    f_s = torch.randn(5, 32, 4, 4)
    with torch.no_grad():
        a = model.denoise(f_s, 3, seed=1, chunk_size=5)
        b = model.denoise(f_s, 3, seed=1, chunk_size=2)
    assert torch.allclose(a, b, atol=1e-5)


def test_replace_known_keeps_the_known_latents(micro_cfg):
    model = MSGLDM(micro_cfg).eval()
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        z0 = model.encode_latents(x)
        z = model.denoise(
            model.condition(x, avail), 3, seed=0, chunk_size=2, z0_known=z0, known=avail, replace_known=True
        )
    mask = model.latent_mask(avail).expand_as(z).bool()
    assert torch.allclose(z[mask], z0[mask])


def test_condition_known_feeds_the_known_latents_and_never_the_missing_ones():
    """diffusion.condition_known: the UNet's condition is [F_s, z0 on the known channels (0 elsewhere), M
    availability maps]; the sample moves with a known modality's latent and not at all with a missing one's."""
    torch.manual_seed(0)
    cfg = micro_config(**{"diffusion.condition_known": True})
    model = MSGLDM(cfg).eval()
    c_s, m = cfg.structure.channels[-1], len(cfg.modalities)
    assert model.unet.conv_in.in_channels == 2 * cfg.latent_channels + c_s + m
    assert MSGLDM(micro_config()).unet.conv_in.in_channels == cfg.latent_channels + c_s  # the paper's
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        z0, f_s = model.encode_latents(x), model.condition(x, avail)
        cond = model.unet_condition(f_s, z0, avail)
        known = model.latent_mask(avail).expand_as(z0).bool()
        assert torch.equal(cond[:, :c_s], f_s)
        z_part = cond[:, c_s : c_s + cfg.latent_channels]
        assert torch.equal(z_part[known], z0[known]) and not z_part[~known].any()
        assert torch.equal(cond[:, -m:, 0, 0], avail.float())

        def run(z_known):
            return model.denoise(f_s, 3, seed=0, chunk_size=2, z0_known=z_known, known=avail)

        base = run(z0)
        k = model.z_per_modality
        missing = z0.clone()
        missing[:, 3 * k : 4 * k] += 5.0  # FLAIR is missing in both rows
        assert torch.equal(run(missing), base)
        moved = z0.clone()
        moved[:, 0:k] += 5.0  # T1 is known in both rows
        assert not torch.allclose(run(moved), base, atol=1e-4)
        with pytest.raises(ValueError, match="condition_known"):
            model.denoise(f_s, 3, seed=0)
        # training: the loss is computed on the same condition (it runs, and backpropagates into the UNet)
        assert model.diffusion_training_loss(None, avail, torch.Generator().manual_seed(0), z0=z0, f_s=f_s) > 0


@requires_data(BRATS)
def test_tiny_model_overfits_a_batch_of_real_slices():
    """Stage-1 reconstruction of two real slices (T1 + FLAIR, 64x64 brain crop): the L1 loss falls 5-fold."""
    from model.io.nifti import read_nifti

    study = {
        "t1": read_nifti(BRATS / "BraTS-GLI-00001-000-t1n.nii.gz"),
        "flair": read_nifti(BRATS / "BraTS-GLI-00001-000-t2f.nii.gz"),
    }
    cfg = micro_config(**{"preprocess.image_size": 64, "modalities": ["t1", "flair"]})
    prep = prepare_study(study, cfg.modalities, cfg.preprocess)
    mid = len(prep.x) // 2
    x = torch.from_numpy(np.ascontiguousarray(prep.x[[mid - 10, mid + 10]]))  # (2, 2, 64, 64) real slices
    torch.manual_seed(0)
    sm = MSGLDM(cfg).structure
    opt = torch.optim.Adam(sm.parameters(), lr=5e-3)
    avail = torch.ones(2, 2, dtype=torch.bool)
    losses = []
    for _ in range(45):
        loss = F.l1_loss(sm(x, avail)["recon"], x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 5, (losses[0], losses[-5:])


def _image_model(**overrides: object) -> MSGLDM:
    torch.manual_seed(0)
    cfg = micro_config(**{"autoencoder.kind": "kl", "diffusion.prediction": "sample", **overrides})
    return MSGLDM(cfg).eval()


def test_image_loss_scores_the_decoded_missing_modality_and_nothing_else():
    model = _image_model(**{"diffusion.image_crop": 4})  # the whole 4x4 latent: the decoded window is the slice
    z = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        x = model.autoencoder.decode(z.reshape(8, 4, 4, 4) / model.cfg.diffusion.latent_scale).reshape(2, 4, 32, 32)
    missing = torch.tensor([[False, False, True, False], [False, False, False, False]])
    gen = torch.Generator().manual_seed(0)
    assert model.image_loss(z, x, missing, gen).item() == pytest.approx(0.0, abs=1e-5)
    other = x.clone()
    other[0, 1] = -other[0, 1]  # an available modality's image: not scored
    assert model.image_loss(z, other, missing, gen).item() == pytest.approx(0.0, abs=1e-5)
    wrong = x.clone()
    wrong[0, 2] = x[0, 3]  # the missing modality's image is another modality's: scored
    assert model.image_loss(z, wrong, missing, gen).item() > 0.05
    assert model.image_loss(z, x, torch.zeros(2, 4, dtype=torch.bool), gen) is None


def test_image_loss_window_is_the_latent_window_times_the_downsampling():
    model = _image_model(**{"diffusion.image_crop": 2})
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        full = model.autoencoder.decode(z.reshape(4, 4, 4, 4) / model.cfg.diffusion.latent_scale).reshape(1, 4, 32, 32)
    missing = torch.tensor([[True, False, False, False]])
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        _ = torch.multinomial(missing.float(), 1, generator=gen)
        i, j = (int(v) for v in torch.randint(0, 3, (2,), generator=gen))
        # the truth is the window decoded on its own: equal where the windows line up, not when shifted by f
        window = model.autoencoder.decode(z[:, 0:4, i : i + 2, j : j + 2] / model.cfg.diffusion.latent_scale)
        x = full.clone()
        x[0, 0, i * 8 : i * 8 + 16, j * 8 : j * 8 + 16] = window[0, 0].detach()
        shifted = torch.roll(x, (8, 8), (-2, -1))
        got = model.image_loss(z, x, missing, torch.Generator().manual_seed(seed)).item()
        assert got == pytest.approx(0.0, abs=1e-5)
        assert model.image_loss(z, shifted, missing, torch.Generator().manual_seed(seed)).item() > 0.01


def test_image_weight_adds_the_weighted_image_term_and_trains_only_the_unet():
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    plain = _image_model()
    with torch.no_grad():
        z0 = plain.encode_latents(x)
    weighted = _image_model(**{"diffusion.image_weight": 0.5})
    weighted.load_state_dict(plain.state_dict())
    weighted.autoencoder.requires_grad_(False)  # as stage 2 freezes stages 0-1: the gradient passes through it
    no_parts: dict[str, float] = {}
    base = plain.diffusion_training_loss(x, avail, torch.Generator().manual_seed(0), z0=z0, parts=no_parts)
    assert no_parts == {}  # the paper's loss: one term
    parts: dict[str, float] = {}
    got = weighted.diffusion_training_loss(x, avail, torch.Generator().manual_seed(0), z0=z0, parts=parts)
    assert parts["latent"] == pytest.approx(base.item(), rel=1e-6)
    assert parts["image"] > 0.05
    assert got.item() == pytest.approx(base.item() + 0.5 * parts["image"], rel=1e-5)
    got.backward()
    assert all(p.grad is None for p in weighted.autoencoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in weighted.unet.parameters())
