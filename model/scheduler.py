"""DDPM forward noising (Ho et al. 2020) and DDIM sampling (Song et al. 2021) for the latent diffusion.

Schedule: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2`` (CompVis "linear", our ``scaled_linear``)
or plain linear. ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``; timesteps are 0-based indices into it.
"""

from __future__ import annotations

import torch

from model.config import DiffusionConfig


class DDIMScheduler:
    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        T = cfg.num_train_timesteps
        if cfg.beta_schedule == "scaled_linear":
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # float64, (T,)

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Closed-form forward process ``q(z_t | z_0)``: ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``."""
        a = self._abar(t, z0)
        return a.sqrt() * z0 + (1.0 - a).sqrt() * eps

    def timesteps(self, steps: int) -> list[int]:
        """Descending DDIM timesteps, uniform spacing (CompVis): ``steps=100`` -> 991, 981, ..., 1."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must lie in [1, {T}], got {steps}")
        c = T // steps
        ts = [i * c + 1 for i in range(steps)]
        ts = [min(t, T - 1) for t in ts]
        return ts[::-1]

    def target(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output at ``t`` for the configured ``prediction``: ``eps``, ``z0`` or
        ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0``."""
        if self.cfg.prediction == "epsilon":
            return eps
        if self.cfg.prediction == "sample":
            return z0
        a = self._abar(t, z0)
        return a.sqrt() * eps - (1.0 - a).sqrt() * z0

    def to_z0(self, model_out: torch.Tensor, t: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """The UNet's output at per-sample timesteps ``t (B,)`` as a clean-latent estimate: itself (``sample``);
        ``(z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (``epsilon``); ``sqrt(abar_t) z_t - sqrt(1 - abar_t) v``."""
        if self.cfg.prediction == "sample":
            return model_out
        a = self._abar(t, z_t)
        if self.cfg.prediction == "v":
            return a.sqrt() * z_t - (1.0 - a).sqrt() * model_out
        return (z_t - (1.0 - a).sqrt() * model_out) / a.sqrt()

    def to_eps(self, model_out: torch.Tensor, t: int, z_t: torch.Tensor) -> torch.Tensor:
        """The UNet's output as a noise estimate: itself (``epsilon``); for ``sample`` (z0) prediction
        ``eps = (z_t - sqrt(abar_t) z0_hat) / sqrt(1 - abar_t)``; for ``v``, ``eps = sqrt(abar_t) v + sqrt(1 - abar_t)
        z_t``."""
        if self.cfg.prediction == "epsilon":
            return model_out
        a_t = float(self.alphas_cumprod[t])
        if self.cfg.prediction == "v":
            return a_t**0.5 * model_out + (1.0 - a_t) ** 0.5 * z_t
        return (z_t - a_t**0.5 * model_out) / (1.0 - a_t) ** 0.5

    def step(
        self,
        eps: torch.Tensor,
        t: int,
        t_prev: int | None,
        z_t: torch.Tensor,
        eta: float,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update (Song et al. 2021, Eq. 12) from ``t`` to ``t_prev`` (None: to the clean sample,
        ``abar = 1``). Returns ``(z_prev, z0_pred)``. ``noise`` is required when ``eta > 0``.
        """
        a_t = float(self.alphas_cumprod[t])
        a_prev = 1.0 if t_prev is None else float(self.alphas_cumprod[t_prev])
        z0_pred = (z_t - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)) ** 0.5 * (1.0 - a_t / a_prev) ** 0.5
        direction = max(1.0 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        z_prev = a_prev**0.5 * z0_pred + direction
        if sigma > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs a noise tensor")
            z_prev = z_prev + sigma * noise
        return z_prev, z0_pred
