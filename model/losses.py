"""Loss functions of the three stages (paper Sec. 2.3; autoencoder losses from Esser et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------- image similarity


def _gaussian_window(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float | torch.Tensor = 2.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004), Gaussian window, valid filtering. ``x, y (B, C, H, W)`` -> ``(B,)``.

    ``data_range`` is a scalar or a ``(B,)`` tensor. The window shrinks to the image for small images. Computed in
    float32 even under autocast: the variances are differences of close numbers, which bf16 cannot resolve.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _ssim(x.float(), y.float(), data_range, window, sigma, k1, k2)


def _ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor, window: int, sigma: float, k1: float, k2: float
) -> torch.Tensor:
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    wx = g.view(1, 1, 1, -1).expand(c, 1, 1, window)
    wy = g.view(1, 1, -1, 1).expand(c, 1, window, 1)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=c), wy, groups=c)

    dr = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * dr) ** 2, (k2 * dr) ** 2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D (n, n)``: ``X = D x`` (scipy ``dct(norm="ortho")``)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2D orthonormal DCT-II over the last two axes (float32 even under autocast)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        dh = dct_matrix(x.shape[-2], x.device, x.dtype)
        dw = dct_matrix(x.shape[-1], x.device, x.dtype)
        return dh @ x @ dw.t()


def dct_ssim_loss(x_hat: torch.Tensor, x: torch.Tensor, mode: str = "amplitude") -> torch.Tensor:
    """``L_freq = 1 - SSIM(A(DCT2(x_hat)), A(DCT2(x)))``. ``x_hat, x (B, C, H, W)`` -> scalar.

    ``mode="amplitude"`` (authors): ``A = |.|`` with data range = max - min of the target's amplitude per image. The
    DC coefficient sets that range, so the term barely sees structure (a sigma-2 blur scores 0.007).
    ``mode="log_amplitude"``: ``A = log(1 + |.|)`` scaled by the target's maximum per image (both images by the same
    factor) with data range 1: the high frequencies, where blur and a wrong contrast differ, weigh in.
    """
    a_hat, a = dct2(x_hat.float()).abs(), dct2(x.float()).abs()
    if mode == "log_amplitude":
        a_hat, a = torch.log1p(a_hat), torch.log1p(a)
        peak = a.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1, 1)
        return (1.0 - ssim(a_hat / peak, a / peak, data_range=1.0)).mean()
    if mode != "amplitude":
        raise ValueError(f"unknown DCT-SSIM mode {mode!r}")
    dr = (a.flatten(1).amax(1) - a.flatten(1).amin(1)).clamp(min=1e-6)
    return (1.0 - ssim(a_hat, a, data_range=dr)).mean()


def structure_aware_loss(x_hat: torch.Tensor, x: torch.Tensor, dct: str = "amplitude") -> torch.Tensor:
    """``L_sa = L1(x_hat, x) + 1 - SSIM(|DCT(x_hat)|, |DCT(x)|)`` (paper Sec. 2.3); ``dct`` as in
    :func:`dct_ssim_loss`."""
    return F.l1_loss(x_hat, x) + dct_ssim_loss(x_hat, x, dct)


# ----------------------------------------------------------------------------------------- stage 1


def style_consistency_loss(
    styles: torch.Tensor, tau: torch.Tensor | float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The paper's style-consistency loss.

    ``styles (B, M, D)``: the M*B style codes are L2-normalised, ``z_pq = tau * s_p . s_q`` and
    ``L_sc = -1/(MB)^2 sum_pq [T_pq log sig(z_pq) + (1 - T_pq) log sig(-z_pq)]`` with ``T_pq = 1`` iff p and q
    are the same modality. ``valid (B, M)`` bool keeps only the codes of present images (default: all).
    """
    b, m, d = styles.shape
    s = F.normalize(styles.float(), dim=-1).reshape(b * m, d)
    modality = torch.arange(m, device=styles.device).repeat(b)
    keep = valid.reshape(b * m) if valid is not None else torch.ones(b * m, dtype=torch.bool, device=styles.device)
    s, modality = s[keep], modality[keep]
    z = tau * s @ s.t()
    target = (modality[:, None] == modality[None, :]).float()
    return F.binary_cross_entropy_with_logits(z, target, reduction="mean")


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0, eps: float = 1e-5, dice: str = "pooled"
) -> torch.Tensor:
    """``L_seg = bce_weight * BCE + (1 - soft Dice)`` (sigmoid outputs, channels [background, regions...]).
    ``dice="pooled"``: one Dice over all channels and pixels, background included; ``"regions"``: the mean over the
    region channels (1:) of each one's Dice over the batch, so missing the tumour costs as much as it should."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    p = torch.sigmoid(logits.float())
    if dice == "regions":
        dims = (0, *range(2, p.ndim))
        inter, total = (p * target)[:, 1:].sum(dims), (p + target)[:, 1:].sum(dims)
        soft = ((2 * inter + eps) / (total + eps)).mean()
    else:
        soft = (2 * (p * target).sum() + eps) / (p.sum() + target.sum() + eps)
    return bce_weight * bce + (1.0 - soft)


def adain_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) on the AdaIN statistics, averaged: ``0.5 (mu^2 + sigma^2 - 1 - log sigma^2)``."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - torch.log(sigma.pow(2) + 1e-8)).mean()


# ----------------------------------------------------------------------------------------- stage 0


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """``lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4)`` at the decoder's last layer (Esser et al. 2021, Eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def diffusion_loss(
    eps_pred: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_LDM = E ||eps - eps_theta(z_t, t | F_s)||^2`` (paper Eq. 1); ``weight`` (broadcastable, e.g. per latent
    channel ``(B, C, 1, 1)``) makes it a weighted mean."""
    err = (eps_pred.float() - eps.float()).pow(2)
    if weight is None:
        return err.mean()
    w = weight.float().expand_as(err)
    return (err * w).sum() / w.sum()
