"""Stage 0: the single-channel autoencoder shared by all modalities, and its PatchGAN discriminator.

The paper says "VAE" (Sec. 2.1); the authors' code trains a VQ-GAN (Esser et al. 2021, taming-transformers):
f = 8 (192 -> 24x24), 4 latent channels, 8192 codes, commitment beta 0.25. ``kind: kl`` swaps the quantiser for
a diagonal-Gaussian posterior (Rombach et al. 2022). Images are ``(B, 1, H, W)`` in [-1, 1]; latents
``(B, latent_channels, H/f, W/f)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import AutoencoderConfig


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (mid block only)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, out_channels: int) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(1, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, cfg.norm_groups))
                c = w
            if level < len(widths) - 1:
                blocks.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.down = nn.Sequential(*blocks)
        mid: list[nn.Module] = [ResBlock(c, c, cfg.norm_groups)]
        if cfg.mid_attention:
            mid.append(AttnBlock(c, cfg.norm_groups))
        mid.append(ResBlock(c, c, cfg.norm_groups))
        self.mid = nn.Sequential(*mid)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        mid: list[nn.Module] = [ResBlock(c, c, cfg.norm_groups)]
        if cfg.mid_attention:
            mid.append(AttnBlock(c, cfg.norm_groups))
        mid.append(ResBlock(c, c, cfg.norm_groups))
        self.mid = nn.Sequential(*mid)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c, widths[level], cfg.norm_groups))
                c = widths[level]
            if level > 0:
                blocks += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with commitment loss and straight-through gradients (van den Oord 2017).

    ``update="loss"`` (the authors'): the codebook learns through the codebook loss ``||sg(z) - e||^2``.
    ``update="ema"``: the codebook is an exponential moving average of its assigned encoder outputs (VQ-VAE-2),
    initialised from the first training batch, and unused codes are restarted on random encoder outputs; only
    the commitment term remains in the loss. Small models train stably with it (the tiny preset).
    """

    def __init__(self, num_codes: int, dim: int, beta: float, update: str = "loss", decay: float = 0.99) -> None:
        super().__init__()
        self.beta, self.update, self.decay = beta, update, decay
        self.codebook = nn.Embedding(num_codes, dim)
        self.codebook.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if update == "ema":
            self.register_buffer("initialized", torch.zeros(()))
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_avg", self.codebook.weight.data.clone())
            self.codebook.weight.requires_grad_(False)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.codebook.num_embeddings
        if not bool(self.initialized):
            pick = torch.randint(0, flat.shape[0], (k,), device=flat.device)
            self.codebook.weight.data.copy_(flat[pick] + 1e-3 * torch.randn_like(flat[pick]))
            self.embed_avg.copy_(self.codebook.weight.data)
            self.cluster_size.fill_(1.0)
            self.initialized.fill_(1.0)
            self._sync_from_rank0()
            return
        onehot = F.one_hot(idx, k).to(flat.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        if _distributed():  # under DDP every rank applies the same, global statistics
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
        self.codebook.weight.data.copy_(self.embed_avg / size[:, None])
        dead = self.cluster_size < 1e-3
        if dead.any():  # restart unused codes on random encoder outputs
            pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)
            self.codebook.weight.data[dead] = flat[pick]
            self.embed_avg[dead] = flat[pick]
            self.cluster_size[dead] = 1.0
            self._sync_from_rank0()

    def _sync_from_rank0(self) -> None:
        if _distributed():
            for t in (self.codebook.weight.data, self.embed_avg, self.cluster_size):
                dist.broadcast(t, src=0)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (z_q, codebook loss, code indices (B, h, w))."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        emb = self.codebook.weight.float()
        with torch.autocast(z.device.type, enabled=False):  # nearest codes in fp32 even under bf16 autocast
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.t() + emb.pow(2).sum(1)[None]
        idx = dist.argmin(1)
        if self.update == "ema" and self.training:
            self._ema_update(flat.detach(), idx)
            idx = (
                flat.pow(2).sum(1, keepdim=True)
                - 2 * flat @ self.codebook.weight.float().t()
                + self.codebook.weight.float().pow(2).sum(1)[None]
            ).argmin(1)
        z_q = self.codebook(idx).view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        if self.update == "loss":
            loss = loss + F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, idx.view(b, h, w)


class Autoencoder(nn.Module):
    """VQ (default) or KL autoencoder for one-channel slices."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, 2 * z if cfg.kind == "kl" else z)
        self.quant_conv = nn.Conv2d(2 * z if cfg.kind == "kl" else z, 2 * z if cfg.kind == "kl" else z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(cfg)
        self.quantizer = (
            VectorQuantizer(cfg.codebook_size, z, cfg.commitment_beta, cfg.codebook_update, cfg.codebook_decay)
            if cfg.kind == "vq"
            else None
        )

    def encode(self, x: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``(B, 1, H, W)`` -> (latent ``(B, z, H/f, W/f)``, regulariser loss).

        VQ: the quantised latent (what the LDM diffuses) and the codebook loss. KL: the posterior mean (or a sample
        when ``sample``) and the KL divergence to N(0, I).
        """
        h = self.quant_conv(self.encoder(x))
        if self.quantizer is not None:
            z_q, loss, _ = self.quantizer(h)
            return z_q, loss
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return z, kl

    def decode(self, z: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Latent ``(B, z, h, w)`` -> image ``(B, 1, 8h, 8w)`` (unbounded; clamp to [-1, 1] for output)."""
        if quantize is None:
            quantize = self.cfg.quantize_on_decode
        if self.quantizer is not None and quantize:
            z, _, _ = self.quantizer(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and regulariser loss (codebook or KL)."""
        z, reg = self.encode(x, sample=True)
        return self.decode(z, quantize=False), reg

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the adaptive GAN weight is computed on (Esser et al. 2021, Eq. 7)."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) with ``layers`` stride-2 convolutions; outputs a logit map ``(B, 1, h, w)``."""

    def __init__(self, layers: int = 3, channels: int = 64) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(1, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = channels
        for n in range(1, layers + 1):
            c_out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        seq.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
