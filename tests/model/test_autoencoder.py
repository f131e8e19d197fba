"""Stage 0: shapes, quantisation, discriminator."""

from __future__ import annotations

import pytest
import torch

from model.autoencoder import Autoencoder, PatchDiscriminator, VectorQuantizer

from .conftest import micro_config


@pytest.mark.parametrize("kind", ["vq", "kl"])
@pytest.mark.parametrize("size,levels", [(32, (1, 1, 2, 4)), (64, (1, 1, 2, 4)), (32, (1, 2))])
def test_shapes(kind, size, levels):
    cfg = micro_config(
        **{
            "autoencoder.kind": kind,
            "autoencoder.channel_mult": list(levels),
            "structure.channels": [4, 8, 16, 32][: len(levels)],
        }
    ).autoencoder
    ae = Autoencoder(cfg)
    x = torch.rand(2, 1, size, size) * 2 - 1
    z, reg = ae.encode(x)
    f = 2 ** (len(levels) - 1)
    assert z.shape == (2, 4, size // f, size // f)
    assert reg.ndim == 0 and reg >= 0
    assert ae.decode(z).shape == x.shape
    x_rec, _ = ae(x)
    assert x_rec.shape == x.shape


def test_quantised_latents_are_codebook_entries_and_pass_gradients():
    vq = VectorQuantizer(16, 4, 0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss, idx = vq(z)
    expected = vq.codebook.weight[idx].permute(0, 3, 1, 2)
    assert torch.allclose(z_q, expected, atol=1e-6)
    z_q.sum().backward()  # straight-through: d z_q / d z = I
    assert torch.allclose(z.grad, torch.ones_like(z))
    assert loss > 0


def test_ema_codebook_initialises_from_data_and_tracks_it():
    vq = VectorQuantizer(8, 2, 0.25, update="ema", decay=0.5).train()
    z = torch.randn(4, 2, 4, 4) * 5 + 3
    for _ in range(5):
        _, loss, _ = vq(z)
    assert (vq.codebook.weight.mean() - 3).abs() < 2.5  # moved from the ~0 init to the data
    assert loss < 0.25 * z.var()


def test_discriminator_patch_logits():
    d = PatchDiscriminator(layers=2, channels=8)
    assert d(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)
