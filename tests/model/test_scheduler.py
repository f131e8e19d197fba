"""DDPM forward process and DDIM sampling."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import DiffusionConfig
from model.scheduler import DDIMScheduler


def test_schedule_is_linear_in_sqrt_beta():
    s = DDIMScheduler(DiffusionConfig())
    assert s.betas[0].item() == pytest.approx(0.0015) and s.betas[-1].item() == pytest.approx(0.0195)
    sq = s.betas.sqrt()
    assert torch.allclose(sq[1:] - sq[:-1], torch.full((999,), (0.0195**0.5 - 0.0015**0.5) / 999, dtype=torch.float64))
    assert s.alphas_cumprod[-1].item() < 0.01  # z_T is essentially pure noise


def test_ddim_timesteps_match_compvis_uniform_spacing():
    s = DDIMScheduler(DiffusionConfig())
    ts = s.timesteps(100)
    assert ts[0] == 991 and ts[-1] == 1 and len(ts) == 100
    assert all(a - b == 10 for a, b in zip(ts, ts[1:], strict=False))
    assert len(s.timesteps(7)) == 7
    with pytest.raises(ValueError):
        s.timesteps(0)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_forward_noising_matches_closed_form_statistically(t):
    s = DDIMScheduler(DiffusionConfig())
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    z0 = torch.full((n, 1), 0.7)
    z_t = s.add_noise(z0, torch.randn(n, 1, generator=gen), torch.full((n,), t))
    abar = s.alphas_cumprod[t].item()
    se = math.sqrt((1 - abar) / n)
    assert abs(z_t.mean().item() - math.sqrt(abar) * 0.7) < 5 * se + 1e-6
    assert z_t.var().item() == pytest.approx(1 - abar, rel=0.02, abs=1e-6)


def test_ddim_with_oracle_noise_recovers_the_clean_latent():
    """On the deterministic path (eta 0), predicting the true noise keeps z_t on q's trajectory: ends at z0."""
    s = DDIMScheduler(DiffusionConfig())
    gen = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    ts = s.timesteps(20)
    z = s.add_noise(z0, eps, torch.full((3,), ts[0]))
    for i, t in enumerate(ts):
        z, _ = s.step(eps, t, ts[i + 1] if i + 1 < len(ts) else None, z, eta=0.0)
    assert torch.allclose(z, z0, atol=1e-4)


def test_ddim_stochastic_step_needs_noise_and_adds_it():
    s = DDIMScheduler(DiffusionConfig())
    z, eps = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError):
        s.step(eps, 501, 491, z, eta=1.0)
    a, _ = s.step(eps, 501, 491, z, eta=1.0, noise=torch.ones_like(z))
    b, _ = s.step(eps, 501, 491, z, eta=0.0)
    assert not torch.allclose(a, b)


def test_sample_prediction_is_converted_to_the_matching_noise():
    s = DDIMScheduler(DiffusionConfig(prediction="sample"))
    gen = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    z_t = s.add_noise(z0, eps, torch.full((2,), 600))
    assert torch.allclose(s.to_eps(z0, 600, z_t), eps, atol=1e-4)
    assert torch.equal(DDIMScheduler(DiffusionConfig()).to_eps(eps, 600, z_t), eps)


def test_v_prediction_round_trips_to_the_noise_and_is_the_training_target():
    s = DDIMScheduler(DiffusionConfig(prediction="v"))
    gen = torch.Generator().manual_seed(3)
    z0, eps = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.full((2,), 600)
    z_t = s.add_noise(z0, eps, t)
    v = s.target(z0, eps, t)
    a = float(s.alphas_cumprod[600])
    assert torch.allclose(v, a**0.5 * eps - (1 - a) ** 0.5 * z0)
    assert torch.allclose(s.to_eps(v, 600, z_t), eps, atol=1e-5)
    assert torch.equal(DDIMScheduler(DiffusionConfig(prediction="sample")).target(z0, eps, t), z0)
    assert torch.equal(DDIMScheduler(DiffusionConfig()).target(z0, eps, t), eps)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_every_prediction_target_converts_back_to_the_clean_latent(prediction):
    s = DDIMScheduler(DiffusionConfig(prediction=prediction))
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 6, 6, generator=gen), torch.randn(3, 4, 6, 6, generator=gen)
    t = torch.tensor([1, 500, 990])
    z_t = s.add_noise(z0, eps, t)
    assert torch.allclose(s.to_z0(s.target(z0, eps, t), t, z_t), z0, atol=1e-3)
