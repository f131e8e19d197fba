"""Stage 1: multi-modal multi-scale structure learning (paper Sec. 2.2, Fig. 2b-f).

Per modality j: a structure encoder ``E_j^str`` with an HFIB at each of L = 4 scales, a style encoder
``E_j^sty`` and an AdaIN reconstruction decoder ``D_j^rec``; shared: MMSF per scale, MSSE, and the segmentation
decoder ``D_seg``. Images ``x`` are ``(B, M, H, W)`` in [-1, 1] in the model's modality order; ``available`` is
``(B, M)`` bool. The structure condition ``f_s`` is ``(B, C_L, H/8, W/8)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import StructureConfig


class ConvBlock(nn.Module):
    """Conv -> Dropout -> InstanceNorm -> LeakyReLU(0.01); ``norm``/``act`` honoured (the authors' ignores them).

    The instance norm is ``GroupNorm(C, C)`` without affine parameters: the same function and (empty) state as
    ``InstanceNorm2d(C)``, but native to channels-last tensors on the CPU (2-4x faster there, no layout copies).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        k: int = 3,
        stride: int = 1,
        dropout: float = 0.0,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.norm = nn.GroupNorm(c_out, c_out, affine=False) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.01, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.drop(self.conv(x))))


class HFIB(nn.Module):
    """High-Frequency Injection Block (paper Eq. 2): ``high = C - G_sigma(C)``; ``S = C + high`` (``add``) or
    ``S = LeakyReLU_0.05(conv3x3([C, high]))`` (``concat``, the authors' code).

    ``G_sigma`` is a 3x3 depthwise Gaussian from one learnable sigma (init 1.0, clamped > 1e-3, normalised to sum
    1), with replicate padding so a constant image has exactly zero high frequency.
    """

    def __init__(self, channels: int, fusion: str = "concat", sigma_init: float = 1.0) -> None:
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"HFIB fusion must be 'add' or 'concat', got {fusion!r}")
        self.channels, self.fusion = channels, fusion
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init)))
        self.fuse = nn.Conv2d(2 * channels, channels, 3, padding=1) if fusion == "concat" else None

    def kernel(self) -> torch.Tensor:
        """Normalised 3x3 Gaussian ``(C, 1, 3, 3)`` from the current sigma."""
        sigma = self.sigma.clamp(min=1e-3)
        r = torch.arange(-1.0, 2.0, device=sigma.device)
        g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
        g = g / g.sum()
        return g.expand(self.channels, 1, 3, 3)

    def high_frequency(self, x: torch.Tensor) -> torch.Tensor:
        """``C_high = C - G(C)`` (Eq. 2), same shape as ``x``."""
        blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernel().to(x.dtype), groups=self.channels)
        return x - blur

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.high_frequency(x)
        if self.fuse is None:
            return x + high
        return F.leaky_relu(self.fuse(torch.cat([x, high], dim=1)), 0.05)


class StructureEncoder(nn.Module):
    """One modality's structure encoder: per scale a (stride-2) conv, two residual convs, an HFIB.

    ``(B, in_channels, H, W)`` -> list of L features, scale l: ``(B, channels[l], H/2^l, W/2^l)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        hfib: bool = True,
        hfib_fusion: str = "concat",
        sigma_init: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.entry, self.res1, self.res2, self.hfib = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_prev = in_channels
        for level, c in enumerate(channels):
            self.entry.append(ConvBlock(c_prev, c, 3, stride=1 if level == 0 else 2))
            self.res1.append(ConvBlock(c, c, 3, dropout=dropout))
            self.res2.append(ConvBlock(c, c, 3))
            self.hfib.append(HFIB(c, hfib_fusion, sigma_init) if hfib else nn.Identity())
            c_prev = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for entry, res1, res2, hfib in zip(self.entry, self.res1, self.res2, self.hfib, strict=True):
            x = entry(x)
            x = x + res2(res1(x))
            x = hfib(x)
            feats.append(x)
        return feats


class MMSF(nn.Module):
    """Multi-Modal Structural Feature Fusion at one scale: per-pixel sigmoid gates ``w_j`` from a 3x3 conv over the
    concatenated modality features, gated features concatenated, 1x1 fusion conv (paper: ``F_l = Fusion(sum w_j S_j)``).
    """

    def __init__(self, num_modalities: int, channels: int) -> None:
        super().__init__()
        self.m = num_modalities
        self.gate = nn.Conv2d(num_modalities * channels, num_modalities, 3, padding=1)
        self.fusion = ConvBlock(num_modalities * channels, channels, 1)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """M features ``(B, C, h, w)`` -> (fused ``(B, C, h, w)``, gates ``(B, M, h, w)`` in [0, 1])."""
        cat = torch.cat(feats, dim=1)
        gates = torch.sigmoid(self.gate(cat))
        gated = torch.cat([f * gates[:, j : j + 1] for j, f in enumerate(feats)], dim=1)
        return self.fusion(gated), gates


class MSSE(nn.Module):
    """Multi-Scale Structure feature Enhancement: ``F_s = F_L + alpha * Attn(F_L, sum_l Resize(Proj(F_l)))``.

    Scales 1..L-1 are projected by 1x1 convs to C_L channels and bilinearly resized to the deepest grid (the paper
    says "Up"; it is a downsampling), summed into the guidance; multi-head cross-attention with queries from
    LayerNorm(F_L) and keys/values from LayerNorm(guidance); 1x1 out conv; alpha learnable (paper) or fixed.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        heads: int = 4,
        alpha_init: float = 0.5,
        alpha_learnable: bool = True,
        resize: str = "bilinear",
    ) -> None:
        super().__init__()
        c = channels[-1]
        self.resize = resize
        self.proj = nn.ModuleList(nn.Conv2d(ci, c, 1) for ci in channels[:-1])
        self.norm_q, self.norm_kv = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.out = nn.Conv2d(c, c, 1)
        alpha = torch.tensor(float(alpha_init))
        if alpha_learnable:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)

    def _resize(self, f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.resize == "area":  # box average over each (H/h x W/w) block: no aliasing
            return F.adaptive_avg_pool2d(f, size)
        return F.interpolate(f, size=size, mode="bilinear", align_corners=False)

    def forward(self, fused: list[torch.Tensor]) -> torch.Tensor:
        f_l = fused[-1]
        b, c, h, w = f_l.shape
        guidance = sum(self._resize(p(f), (h, w)) for p, f in zip(self.proj, fused[:-1], strict=True))
        q = self.norm_q(f_l.flatten(2).transpose(1, 2))
        kv = self.norm_kv(guidance.flatten(2).transpose(1, 2))
        a, _ = self.attn(q, kv, kv, need_weights=False)
        a = self.out(a.transpose(1, 2).reshape(b, c, h, w))
        return f_l + self.alpha * a


class StyleEncoder(nn.Module):
    """7x7 conv, ``downsamples`` 4x4 stride-2 convs, global average pool, plain 1x1 conv -> ``(B, style_dim)``.

    The last layer is a plain conv (the authors' normalises a 1x1 map, which PyTorch rejects).
    """

    def __init__(self, in_channels: int = 1, base: int = 32, downsamples: int = 4, style_dim: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBlock(in_channels, base, 7, norm=False)]
        c = base
        for i in range(downsamples):
            c_out = base * min(2 ** (i + 1), 4)
            layers.append(ConvBlock(c, c_out, 4, stride=2, norm=False))
            c = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, style_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.body(x), 1)
        return self.head(h).flatten(1)


class AdaINResBlock(nn.Module):
    """Residual block of two 3x3 convs, each followed by AdaIN ``sigma * IN(h) + mu`` with external statistics."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    @staticmethod
    def adain(h: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return sigma[..., None, None] * F.instance_norm(h) + mu[..., None, None]

    def forward(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """mu/sigma ``(B, 2, C)``: statistics of the two AdaIN layers."""
        h = F.relu(self.adain(self.conv1(x), mu[:, 0], sigma[:, 0]))
        h = self.adain(self.conv2(h), mu[:, 1], sigma[:, 1])
        return x + h


class ReconstructionDecoder(nn.Module):
    """``X_hat_j = D_j^rec(F_s, S_j)``: AdaIN residual blocks at the F_s grid (statistics from an MLP on the style
    code), then (bilinear x2, 5x5 conv) per scale back to full size, 7x7 conv, tanh.
    """

    def __init__(
        self, channels: tuple[int, ...], style_dim: int = 8, res_blocks: int = 4, mlp_channels: int = 256
    ) -> None:
        super().__init__()
        c = channels[-1]
        self.res_blocks, self.c = res_blocks, c
        self.mlp = nn.Sequential(
            nn.Linear(style_dim, mlp_channels), nn.ReLU(True), nn.Linear(mlp_channels, mlp_channels), nn.ReLU(True)
        )
        n_stats = res_blocks * 2 * c
        self.mu_head = nn.Linear(mlp_channels, n_stats)
        self.sigma_head = nn.Linear(mlp_channels, n_stats)
        self.blocks = nn.ModuleList(AdaINResBlock(c) for _ in range(res_blocks))
        ups: list[nn.Module] = []
        for c_out in reversed(channels[:-1]):
            ups += [nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False), ConvBlock(c, c_out, 5)]
            c = c_out
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(c, 1, 7, padding=3)

    def style_stats(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Style ``(B, D)`` -> AdaIN (mu, sigma), each ``(B, res_blocks, 2, C)``; sigma > 0 via softplus."""
        h = self.mlp(style)
        shape = (style.shape[0], self.res_blocks, 2, self.c)
        mu = self.mu_head(h).view(shape)
        sigma = F.softplus(self.sigma_head(h) + math.log(math.e - 1)).view(shape) + 1e-4  # softplus(.)=1 at 0
        return mu, sigma

    def forward(self, f_s: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image ``(B, 1, H, W)`` in [-1, 1], mu, sigma)."""
        mu, sigma = self.style_stats(style)
        h = f_s
        for i, block in enumerate(self.blocks):
            h = block(h, mu[:, i], sigma[:, i])
        return torch.tanh(self.out(self.up(h))), mu, sigma


class SegmentationDecoder(nn.Module):
    """Shared U-Net-style decoder over the fused features ``F_L .. F_1`` -> logits ``(B, classes, H, W)``."""

    def __init__(self, channels: tuple[int, ...], classes: int = 4) -> None:
        super().__init__()
        self.up, self.merge = nn.ModuleList(), nn.ModuleList()
        c = channels[-1]
        for c_skip in reversed(channels[:-1]):
            self.up.append(ConvBlock(c, c_skip, 3))
            self.merge.append(ConvBlock(2 * c_skip, c_skip, 3))
            c = c_skip
        self.head = nn.Conv2d(c, classes, 1)  # plain conv: logits

    def forward(self, fused: list[torch.Tensor]) -> torch.Tensor:
        h = fused[-1]
        for up, merge, skip in zip(self.up, self.merge, reversed(fused[:-1]), strict=True):
            h = up(F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            h = merge(torch.cat([h, skip], dim=1))
        return self.head(h)


class StructureModel(nn.Module):
    """The whole stage-1 model for M modalities."""

    def __init__(self, cfg: StructureConfig, num_modalities: int) -> None:
        super().__init__()
        self.cfg, self.m = cfg, num_modalities
        ch = tuple(cfg.channels)
        self.encoders = nn.ModuleList(
            StructureEncoder(1, ch, cfg.hfib, cfg.hfib_fusion, cfg.hfib_sigma_init, cfg.dropout)
            for _ in range(num_modalities)
        )
        self.mmsf = nn.ModuleList(MMSF(num_modalities, c) for c in ch) if cfg.mmsf else None
        self.msse = (
            MSSE(ch, cfg.msse_heads, cfg.msse_alpha_init, cfg.msse_alpha_learnable, cfg.msse_resize)
            if cfg.msse
            else None
        )
        self.style_encoders = nn.ModuleList(
            StyleEncoder(1, cfg.style_base_channels, cfg.style_downsamples, cfg.style_dim)
            for _ in range(num_modalities)
        )
        self.decoders = nn.ModuleList(
            ReconstructionDecoder(ch, cfg.style_dim, cfg.decoder_res_blocks, cfg.decoder_mlp_channels)
            for _ in range(num_modalities)
        )
        self.seg_decoder = SegmentationDecoder(ch, cfg.seg_classes)
        # learnable temperature of L_sc, stored as log(tau) and clamped to [0, log tau_max] when used
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init)))

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.clamp(0.0, math.log(self.cfg.tau_max)).exp()

    def encode_structure(self, x: torch.Tensor, available: torch.Tensor) -> dict[str, object]:
        """Structure path: ``x (B, M, H, W)``, ``available (B, M)`` -> ``{"f_s", "fused", "gates"}``.

        1. encode every modality (a modality missing from the whole batch is not even run);
        2. zero the missing modalities' features at every scale (so their input values are irrelevant);
        3. fuse per scale with MMSF (or mean over available modalities when ``mmsf`` is off);
        4. MSSE -> ``f_s (B, C_L, H/8, W/8)``.
        """
        return self.fuse(self.modality_features(x, available), available)

    def modality_features(self, x: torch.Tensor, available: torch.Tensor) -> list[list[torch.Tensor] | None]:
        """Step 1: every scale's features of each modality available anywhere in the batch (None: not run). They
        do not depend on which other modalities are available, so one pass serves every input subset."""
        return [enc(x[:, j : j + 1]) if bool(available[:, j].any()) else None for j, enc in enumerate(self.encoders)]

    def fuse(self, per_mod: list[list[torch.Tensor] | None], available: torch.Tensor) -> dict[str, object]:
        """Steps 2-4 of :meth:`encode_structure` on :meth:`modality_features`' output."""
        template = next((f for f in per_mod if f is not None), None)
        if template is None:
            raise ValueError("encode_structure needs at least one available modality")
        avail = available.to(dtype=template[0].dtype, device=template[0].device)
        feats_by_mod = [
            [t * avail[:, j, None, None, None] for t in f] if f is not None else [torch.zeros_like(t) for t in template]
            for j, f in enumerate(per_mod)
        ]
        fused, gates = [], []
        for level in range(len(self.cfg.channels)):
            feats = [feats_by_mod[j][level] for j in range(self.m)]
            if self.mmsf is not None:
                f, g = self.mmsf[level](feats)
            else:
                f = sum(feats) / avail.sum(1).clamp(min=1)[:, None, None, None]
                g = avail[:, :, None, None].expand(-1, -1, *feats[0].shape[-2:])
            fused.append(f)
            gates.append(g)
        f_s = self.msse(fused) if self.msse is not None else fused[-1]
        return {"f_s": f_s, "fused": fused, "gates": gates}

    def forward(self, x: torch.Tensor, available: torch.Tensor) -> dict[str, object]:
        """Training forward: structure, style codes ``(B, M, D)``, reconstructions ``(B, M, H, W)``, AdaIN stats,
        segmentation logits ``(B, classes, H, W)``, the L_sc temperature ``tau``."""
        out = self.encode_structure(x, available)
        f_s = out["f_s"]
        styles, recon, mus, sigmas = [], [], [], []
        for j in range(self.m):
            s = self.style_encoders[j](x[:, j : j + 1])
            x_hat, mu, sigma = self.decoders[j](f_s, s)
            styles.append(s)
            recon.append(x_hat[:, 0])
            mus.append(mu)
            sigmas.append(sigma)
        out.update(
            styles=torch.stack(styles, 1),
            recon=torch.stack(recon, 1),
            adain_mu=torch.stack(mus, 1),
            adain_sigma=torch.stack(sigmas, 1),
            seg_logits=self.seg_decoder(out["fused"]),
            tau=self.tau,  # returned from forward so that DDP sees the temperature used inside the graph
        )
        return out

    def segment(self, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Segmentation probabilities ``(B, classes, H, W)`` [background, WT, TC, ET] from the available inputs."""
        return torch.sigmoid(self.seg_decoder(self.encode_structure(x, available)["fused"]))
