"""Stage 2 UNet: shape table, conditioning and timestep are used."""

from __future__ import annotations

import pytest
import torch

from model.unet import UNet

from .conftest import micro_config


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("lat", [4, 8])
@pytest.mark.parametrize("mult,attn", [((1, 1, 2), (1, 2)), ((1, 2), (1,))])
def test_shape_table(m, lat, mult, attn):
    cfg = micro_config(**{"unet.channel_mult": list(mult), "unet.attention_levels": list(attn)}).unet
    unet = UNet(cfg, 4 * m, 32)
    eps = unet(torch.randn(2, 4 * m, lat, lat), torch.tensor([0, 999]), torch.randn(2, 32, lat, lat))
    assert eps.shape == (2, 4 * m, lat, lat)


def test_output_depends_on_condition_and_timestep_after_training_step():
    torch.manual_seed(0)
    unet = UNet(micro_config().unet, 8, 32)
    z, f = torch.randn(2, 8, 4, 4), torch.randn(2, 32, 4, 4)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-2)
    for _ in range(3):  # move off the zero-initialised output
        opt.zero_grad()
        (unet(z, torch.tensor([1, 2]), f) - 1.0).pow(2).mean().backward()
        opt.step()
    base = unet(z, torch.tensor([10, 10]), f)
    assert not torch.allclose(base, unet(z, torch.tensor([900, 900]), f))
    assert not torch.allclose(base, unet(z, torch.tensor([10, 10]), f + 1))
