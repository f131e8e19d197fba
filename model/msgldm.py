"""MSG-LDM glue: the three stages in one module, the stage-2 training loss and the reverse diffusion.

Tensor spaces: ``x (B, M, H, W)`` images in [-1, 1] in the model's modality order; ``available (B, M)`` bool;
``z`` latents ``(B, 4M, h, w)`` (modality j owns channels ``4j .. 4j+3``); ``f_s (B, C_s, h, w)`` the structure
condition; ``eps`` noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from model.autoencoder import Autoencoder
from model.config import MSGLDMConfig
from model.losses import diffusion_loss, ssim
from model.scheduler import DDIMScheduler
from model.structure import StructureModel
from model.unet import UNet


class MSGLDM(nn.Module):
    def __init__(self, cfg: MSGLDMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities
        self.autoencoder = Autoencoder(cfg.autoencoder)
        self.structure = StructureModel(cfg.structure, len(cfg.modalities))
        self.unet = UNet(cfg.unet, cfg.latent_channels, self.condition_channels)
        self.scheduler = DDIMScheduler(cfg.diffusion)

    @property
    def z_per_modality(self) -> int:
        return self.cfg.autoencoder.latent_channels

    @property
    def condition_channels(self) -> int:
        """Channels of the UNet's condition: F_s (paper), plus the known latents and M availability maps with
        ``diffusion.condition_known``."""
        extra = self.cfg.latent_channels + len(self.modalities) if self.cfg.diffusion.condition_known else 0
        return self.cfg.structure.channels[-1] + extra

    # ------------------------------------------------------------------ stage 0/1 wrappers

    def encode_latents(self, x: torch.Tensor, only: Sequence[int] | None = None) -> torch.Tensor:
        """``x (B, M, H, W)`` -> ``z0 (B, 4M, h, w)``: each modality through the shared encoder, scaled; with ``only``
        just those modality indices are encoded and every other modality's channels are zero (inference needs
        the available modalities' latents alone)."""
        b, m, h, w = x.shape
        idx = list(range(m)) if only is None else list(only)
        z, _ = self.autoencoder.encode(x[:, idx].reshape(b * len(idx), 1, h, w))
        out = z.new_zeros(b, m, self.z_per_modality, *z.shape[-2:])
        out[:, idx] = z.reshape(b, len(idx), self.z_per_modality, *z.shape[-2:])
        return out.flatten(1, 2) * self.cfg.diffusion.latent_scale

    def decode_latents(self, z: torch.Tensor, modality_indices: list[int] | None = None) -> torch.Tensor:
        """``z (B, 4M, h, w)`` -> images ``(B, K, H, W)`` in [-1, 1] for the K chosen modalities (default all)."""
        idx = list(range(len(self.modalities))) if modality_indices is None else list(modality_indices)
        k = self.z_per_modality
        parts = torch.stack([z[:, j * k : (j + 1) * k] for j in idx], 1)  # (B, K, 4, h, w)
        b = parts.shape[0]
        x = self.autoencoder.decode(parts.flatten(0, 1) / self.cfg.diffusion.latent_scale)
        return x.clamp(-1.0, 1.0).reshape(b, len(idx), *x.shape[-2:])

    def condition(self, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Structure condition ``f_s`` from the available modalities (stage-1 model)."""
        return self.structure.encode_structure(x, available)["f_s"]

    def latent_mask(self, available: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` bool -> ``(B, 4M, 1, 1)`` float: 1 on the latent channels of the given modalities."""
        return available.float().repeat_interleave(self.z_per_modality, dim=1)[:, :, None, None]

    def needs_known_latents(self, replace_known: bool) -> bool:
        """Whether sampling needs the available modalities' latents: for inpainting (``replace_known``) or for the
        UNet's condition (``diffusion.condition_known``)."""
        return replace_known or self.cfg.diffusion.condition_known

    def unet_condition(
        self, f_s: torch.Tensor, z0_known: torch.Tensor | None = None, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the UNet is conditioned on (concatenated to ``z_t``): ``f_s`` alone (paper), or with
        ``diffusion.condition_known`` also ``[z0 * mask(known), known as M constant maps]``: the available
        modalities' clean latents, zero on the missing ones, and which ones they are."""
        if not self.cfg.diffusion.condition_known:
            return f_s
        if z0_known is None or known is None:
            raise ValueError("diffusion.condition_known: the UNet needs the known modalities' latents and mask")
        known = known.to(f_s.device)
        z_known = z0_known.to(f_s) * self.latent_mask(known).to(f_s)
        maps = known.to(f_s)[:, :, None, None].expand(-1, -1, *f_s.shape[-2:])
        return torch.cat([f_s, z_known, maps], 1)

    # ------------------------------------------------------------------ stage 2

    def diffusion_training_loss(
        self,
        x: torch.Tensor | None,
        available: torch.Tensor,
        generator: torch.Generator | None = None,
        z0: torch.Tensor | None = None,
        f_s: torch.Tensor | None = None,
        unet: nn.Module | None = None,
        present: torch.Tensor | None = None,
        parts: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """Paper Eq. 1 with the frozen stages 0-1 (the one stage-2 loss: the trainer calls it too):

        1. ``z0`` = latents of all M modalities (the joint target), ``f_s`` from the available ones (either may be
           passed in precomputed: the trainer's caches; then ``x`` may be None);
        2. ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps``;
        3. ``|| target - net([z_t, f_s], t) ||^2`` with target ``eps`` (paper), ``z0`` or ``v`` (``prediction``),
           the missing modalities' latent channels weighted by ``missing_weight`` (paper: 1, a plain mean);
        4. beyond the paper, with ``diffusion.image_weight`` > 0 (needs ``x``): plus that weight x :meth:`image_loss`
           of the predicted z0 (the decoder is frozen; its gradient reaches the UNet through the latent).
        ``unet`` replaces ``self.unet`` (a DDP-wrapped copy, or the EMA shadow in validation); ``present (B, M)``
        says which modalities ``x`` holds (default all); ``parts`` receives the two terms (``latent``, ``image``) when
        the image term is on.
        """
        with torch.no_grad():
            z0 = self.encode_latents(x) if z0 is None else z0
            f_s = self.condition(x, available) if f_s is None else f_s
        t = torch.randint(0, self.scheduler.num_train_timesteps, (z0.shape[0],), generator=generator).to(z0.device)
        eps = torch.randn(z0.shape, generator=generator).to(z0)
        z_t = self.scheduler.add_noise(z0, eps, t)
        weight = None
        if self.cfg.diffusion.missing_weight != 1.0:
            missing = 1.0 - self.latent_mask(available.to(z0.device)).to(z0)
            weight = 1.0 + (self.cfg.diffusion.missing_weight - 1.0) * missing
        net = self.unet if unet is None else unet
        cond = self.unet_condition(f_s.to(z0), z0, available)
        out = net(z_t, t, cond)
        loss = diffusion_loss(out, self.scheduler.target(z0, eps, t), weight)
        if self.cfg.diffusion.image_weight > 0 and x is not None:
            present = torch.ones_like(available) if present is None else present.to(available.device)
            img = self.image_loss(self.scheduler.to_z0(out, t, z_t), x, present & ~available, generator)
            if img is not None:
                if parts is not None:
                    parts.update(latent=loss.item(), image=img.item())
                loss = loss + self.cfg.diffusion.image_weight * img
        return loss

    def image_loss(
        self, z0_hat: torch.Tensor, x: torch.Tensor, missing: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor | None:
        """``L1 + 1 - SSIM`` (data range 2) between the decoded predicted latent and the true image, for one random
        missing modality per sample over one random ``diffusion.image_crop``-squared latent window (the matching
        ``f``-times larger image window). None when no sample misses a present modality."""
        rows = missing.any(1).nonzero().squeeze(1).cpu()
        if rows.numel() == 0:
            return None
        pick = torch.multinomial(missing[rows].float().cpu(), 1, generator=generator).squeeze(1)
        k, h = self.z_per_modality, z0_hat.shape[-1]
        c = min(self.cfg.diffusion.image_crop, h)
        i, j = (int(v) for v in torch.randint(0, h - c + 1, (2,), generator=generator))
        z = torch.stack([z0_hat[r, m * k : (m + 1) * k, i : i + c, j : j + c] for r, m in zip(rows, pick, strict=True)])
        f = x.shape[-1] // h
        truth = x[rows.to(x.device), pick.to(x.device), i * f : (i + c) * f, j * f : (j + c) * f][:, None]
        rec = self.autoencoder.decode(z / self.cfg.diffusion.latent_scale).float()
        return (rec - truth).abs().mean() + (1 - ssim(rec, truth.float(), 2.0)).mean()

    def denoise(
        self,
        f_s: torch.Tensor,
        steps: int,
        *,
        eta: float | None = None,
        seed: int = 0,
        chunk_size: int = 64,
        z0_known: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        replace_known: bool | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """DDIM reverse diffusion for a stack of slices, in chunks: ``f_s (S, C_s, h, w)`` -> ``z0 (S, 4M, h, w)``.

        1. ``z_T ~ N(0, I)`` and every step's noise are drawn on the CPU from ``seed`` for the whole stack (results
           do not depend on the device or the chunk size);
        2. for each DDIM timestep: ``eps`` by the UNet chunk by chunk, DDIM update (Song et al. 2021, Eq. 12);
        3. optional inpainting (``replace_known``, default the config's): the ``known (S, M)`` modalities' channels
           are replaced by their noised true latents ``z0_known`` at the next timestep (clean at the end); with
           ``diffusion.condition_known`` the UNet is also conditioned on ``z0_known`` (:meth:`unet_condition`);
        4. ``callback(step, steps)`` after every step (exceptions propagate: that is how a caller cancels).
        """
        eta = self.cfg.diffusion.eta if eta is None else eta
        replace_known = self.cfg.diffusion.replace_known if replace_known is None else replace_known
        gen = torch.Generator().manual_seed(int(seed))
        shape = (f_s.shape[0], self.cfg.latent_channels, *f_s.shape[-2:])
        z = torch.randn(shape, generator=gen).to(f_s.device, torch.float32)
        cond = self.unet_condition(f_s, z0_known, known)
        replace = replace_known and known is not None and z0_known is not None
        mask = self.latent_mask(known).to(z) if replace else None
        ts = self.scheduler.timesteps(steps)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else None
            noise = torch.randn(shape, generator=gen).to(z) if eta > 0 else None
            z_next = torch.empty_like(z)
            for start in range(0, shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                t_batch = torch.full((z[sl].shape[0],), t, device=z.device, dtype=torch.long)
                eps = self.scheduler.to_eps(self.unet(z[sl], t_batch, cond[sl]).float(), t, z[sl])
                z_next[sl], _ = self.scheduler.step(eps, t, t_prev, z[sl], eta, None if noise is None else noise[sl])
            if mask is not None:
                if t_prev is None:
                    z_known_t = z0_known
                else:
                    fresh = torch.randn(shape, generator=gen).to(z)
                    z_known_t = self.scheduler.add_noise(z0_known, fresh, torch.full((shape[0],), t_prev))
                z_next = mask * z_known_t + (1 - mask) * z_next
            z = z_next
            if callback is not None:
                callback(i + 1, len(ts))
        return z

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        available: torch.Tensor,
        steps: int | None = None,
        *,
        seed: int = 0,
        eta: float | None = None,
        replace_known: bool | None = None,
        targets: list[int] | None = None,
    ) -> torch.Tensor:
        """The modalities ``targets`` (default all M) as ``(B, len(targets), H, W)`` in [-1, 1] from the available
        ones (small batches; see pipeline). Only the modalities available in some row are encoded, only the
        targets decoded: the other latents are masked out or unused."""
        steps = steps or self.cfg.diffusion.default_steps
        replace_known = self.cfg.diffusion.replace_known if replace_known is None else replace_known
        f_s = self.condition(x, available)
        need_known = self.needs_known_latents(replace_known)
        present = [i for i in range(x.shape[1]) if bool(available[:, i].any())]
        z0_known = self.encode_latents(x, only=present) if need_known else None
        z = self.denoise(
            f_s,
            steps,
            eta=eta,
            seed=seed,
            chunk_size=x.shape[0],
            z0_known=z0_known,
            known=available if need_known else None,
            replace_known=replace_known,
        )
        return self.decode_latents(z, targets)
