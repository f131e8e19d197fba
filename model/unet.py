"""Stage 2 denoiser: the CompVis/ADM UNet with concat conditioning (paper Eq. 1, ``eps_theta(z_t, t | F_s)``).

Input ``cat([z_t, f_s])``: ``(B, 4M + C_s, h, w)``; output ``eps`` ``(B, 4M, h, w)``. Levels follow
``channel_mult`` (24 -> 12 -> 6 for the default), ``num_res_blocks`` per level, multi-head self-attention
(``head_channels`` per head) at the levels in ``attention_levels``; no cross-attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` (Vaswani et al. 2017, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c)


class TimeResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)
        self.norm2, self.drop = _norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(F.silu(t_emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, c: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.heads = c // head_channels
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2)
        a = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, heads, hw, d)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``forward(z_t (B, C_z, h, w), t (B,), f_s (B, C_s, h, w)) -> eps (B, C_z, h, w)``."""

    def __init__(self, cfg: UNetConfig, latent_channels: int, cond_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.base_channels
        self.t_dim = 4 * c0
        self.t_mlp = nn.Sequential(nn.Linear(c0, self.t_dim), nn.SiLU(), nn.Linear(self.t_dim, self.t_dim))
        self.conv_in = nn.Conv2d(latent_channels + cond_channels, c0, 3, padding=1)
        g, d = cfg.norm_groups, cfg.dropout
        self.down = nn.ModuleList()
        skips = [c0]
        c = c0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blk = nn.ModuleList([TimeResBlock(c, c0 * mult, self.t_dim, g, d)])
                c = c0 * mult
                if level in cfg.attention_levels:
                    blk.append(SelfAttention(c, cfg.head_channels, g))
                self.down.append(blk)
                skips.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid1 = TimeResBlock(c, c, self.t_dim, g, d)
        self.mid_attn = SelfAttention(c, cfg.head_channels, g)
        self.mid2 = TimeResBlock(c, c, self.t_dim, g, d)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blk = nn.ModuleList([TimeResBlock(c + skips.pop(), c0 * mult, self.t_dim, g, d)])
                c = c0 * mult
                if level in cfg.attention_levels:
                    blk.append(SelfAttention(c, cfg.head_channels, g))
                if level > 0 and i == cfg.num_res_blocks:
                    blk.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                    blk.append(nn.Conv2d(c, c, 3, padding=1))
                self.up.append(blk)
        self.norm_out = _norm(c, g)
        self.conv_out = nn.Conv2d(c, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blk: nn.ModuleList, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        for layer in blk:
            h = layer(h, t_emb) if isinstance(layer, TimeResBlock) else layer(h)
        return h

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
        t_emb = self.t_mlp(timestep_embedding(t, self.cfg.base_channels).to(z_t.dtype))
        h = self.conv_in(torch.cat([z_t, f_s.to(z_t.dtype)], dim=1))
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, t_emb)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, t_emb)), t_emb)
        for blk in self.up:
            h = self._run(blk, torch.cat([h, hs.pop()], dim=1), t_emb)
        return self.conv_out(F.silu(self.norm_out(h)))
