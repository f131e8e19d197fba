"""Image-similarity and overlap metrics as pure numpy functions (no torch, no state).

SSIM follows Wang et al. 2004 with the settings every peer uses (torchmetrics, skimage ``gaussian_weights=True``,
the BraSyn scorer): a Gaussian window of 11 taps (sigma 1.5, truncated at 3.5 sigma), ``K1 = 0.01``,
``K2 = 0.03``, population (not sample) covariances, reflect padding, and the mean taken over the map with the
half-window border (5 voxels) cropped away, as skimage does. It works on 2D images, 3D volumes, or stacks of
2D slices (:func:`ssim_slices`). Hand-written rather than skimage so that the project needs no extra
dependency and the border/covariance choices are visible here.

Conventions: identical images give PSNR ``inf`` and SSIM 1; Dice of two empty masks is 1 (nothing to find,
nothing found), as in the BraTS scorer; a mask that selects nothing gives ``nan``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

WIN_SIZE = 11
SIGMA = 1.5
_TRUNCATE = 3.5  # radius = int(3.5 * 1.5 + 0.5) = 5 -> 11 taps
_FLOAT32_ABOVE = 2_000_000  # voxels


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return x, y


def _select(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if mask is None:
        return x.ravel(), y.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    return x[mask], y[mask]


def mse(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error, over ``mask`` when given."""
    a, b = _select(*_pair(x, y), mask)
    return float(np.mean((a - b) ** 2)) if a.size else float("nan")


def mae(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error, over ``mask`` when given."""
    a, b = _select(*_pair(x, y), mask)
    return float(np.mean(np.abs(a - b))) if a.size else float("nan")


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, over ``mask`` when given."""
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    err = mse(x, y, mask)
    if np.isnan(err):
        return err
    if err == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / err))


def ssim_map(
    x: np.ndarray, y: np.ndarray, data_range: float = 1.0, *, axes: Sequence[int] | None = None,
    sigma: float = SIGMA,
) -> np.ndarray:
    """The local SSIM at every voxel (same shape as the input), Gaussian-weighted over ``axes`` (default all).

    Axes not in ``axes`` are batch axes (e.g. the slice axis of a stack of 2D slices).
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    x, y = _pair(x, y)
    if x.size > _FLOAT32_ABOVE:  # big volumes: float32 filtering halves the time; error ~1e-7 << C2 = 9e-4
        x, y = x.astype(np.float32), y.astype(np.float32)
    axes = tuple(range(x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
    sig = [sigma if a in axes else 0.0 for a in range(x.ndim)]

    def blur(v: np.ndarray) -> np.ndarray:
        return gaussian_filter(v, sigma=sig, mode="reflect", truncate=_TRUNCATE)

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return num / den


def _crop(v: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    pad = (WIN_SIZE - 1) // 2
    index = [slice(None)] * v.ndim
    for a in axes:
        if v.shape[a] <= 2 * pad:
            raise ValueError(f"SSIM needs at least {WIN_SIZE} voxels along axis {a}, got shape {v.shape}")
        index[a] = slice(pad, -pad)
    return v[tuple(index)]


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, mask: np.ndarray | None = None) -> float:
    """Mean SSIM over all axes of ``x`` (a 2D image -> 2D SSIM, a 3D volume -> 3D SSIM).

    With ``mask``, the map is averaged over the mask's voxels only (after the same border crop). Without one,
    only the bounding box of the non-zero voxels (plus two window radii) is filtered: wherever both images are
    zero over a whole window the local SSIM is exactly 1, so skipping that background changes nothing but time.
    """
    x, y = _pair(x, y)
    axes = tuple(range(x.ndim))
    if mask is not None:
        smap = _crop(ssim_map(x, y, data_range, axes=axes), axes)
        mask = _crop(np.asarray(mask, dtype=bool), axes)
        return float(smap[mask].mean(dtype=np.float64)) if mask.any() else float("nan")
    r = (WIN_SIZE - 1) // 2
    for a in axes:  # same shape checks as the full computation
        if x.shape[a] <= 2 * r:
            raise ValueError(f"SSIM needs at least {WIN_SIZE} voxels along axis {a}, got shape {x.shape}")
    nonzero = (x != 0) | (y != 0)
    total = int(np.prod([n - 2 * r for n in x.shape]))
    if not nonzero.any():
        return 1.0
    lo_hi = []
    for a in axes:
        idx = np.nonzero(nonzero.any(axis=tuple(b for b in axes if b != a)))[0]
        lo_hi.append((int(idx[0]), int(idx[-1]) + 1))
    # computed box: non-zero bbox + 2r (each voxel within r of the bbox sees only voxels inside it)
    box = tuple(slice(max(lo - 2 * r, 0), min(hi + 2 * r, n)) for (lo, hi), n in zip(lo_hi, x.shape, strict=True))
    smap = ssim_map(x[box], y[box], data_range, axes=axes)
    # voxels counted: within r of the bbox, and inside the border crop of the whole image
    keep = []
    for (lo, hi), n, b in zip(lo_hi, x.shape, box, strict=True):
        start, stop = max(lo - r, r), min(hi + r, n - r)
        keep.append(slice(start - b.start, max(stop, start) - b.start))
    inner = smap[tuple(keep)]
    return float((inner.sum(dtype=np.float64) + (total - inner.size)) / total)


def ssim_in_masks(x: np.ndarray, y: np.ndarray, masks: dict[str, np.ndarray], data_range: float = 1.0
                  ) -> dict[str, float]:
    """Mean of one SSIM map (all axes) inside each of several masks: ``{name: mean}`` (``nan`` for an empty
    mask). Computes the map once, e.g. for tumour / non-tumour SSIM of a volume."""
    x, y = _pair(x, y)
    axes = tuple(range(x.ndim))
    smap = _crop(ssim_map(x, y, data_range, axes=axes), axes)
    out = {}
    for name, mask in masks.items():
        m = np.asarray(mask, dtype=bool)
        if m.shape != x.shape:
            raise ValueError(f"mask {name!r} shape {m.shape} differs from image shape {x.shape}")
        m = _crop(m, axes)
        out[name] = float(smap[m].mean(dtype=np.float64)) if m.any() else float("nan")
    return out


def ssim_3d(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, mask: np.ndarray | None = None) -> float:
    """3D SSIM of two volumes (the BraSyn protocol's measure)."""
    if np.ndim(x) != 3:
        raise ValueError(f"ssim_3d takes 3D volumes, got shape {np.shape(x)}")
    return ssim(x, y, data_range, mask)


def ssim_slices(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, axis: int = 0) -> np.ndarray:
    """2D SSIM of every slice along ``axis`` of two stacks: one value per slice, shape ``(x.shape[axis],)``."""
    x, y = _pair(x, y)
    x, y = np.moveaxis(x, axis, 0), np.moveaxis(y, axis, 0)
    spatial = tuple(range(1, x.ndim))
    smap = _crop(ssim_map(x, y, data_range, axes=spatial), spatial)
    return smap.reshape(smap.shape[0], -1).mean(axis=1, dtype=np.float64)


def psnr_slices(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, axis: int = 0) -> np.ndarray:
    """PSNR of every slice along ``axis``: shape ``(x.shape[axis],)``; identical slices give ``inf``."""
    x, y = _pair(x, y)
    x, y = np.moveaxis(x, axis, 0), np.moveaxis(y, axis, 0)
    err = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / err)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap ``2|P & R| / (|P| + |R|)`` of two boolean masks; 1.0 when both are empty."""
    p = np.asarray(pred, dtype=bool)
    r = np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {r.shape}")
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, r).sum() / total)


def dice_regions(pred: np.ndarray, ref: np.ndarray, names: Sequence[str] = ("WT", "TC", "ET")) -> dict[str, float]:
    """Dice per tumour region of ``(4, ...)`` region stacks ``[background, WT, TC, ET]`` plus their ``mean``."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or pred.shape[0] != len(names) + 1:
        raise ValueError(f"expected two (4, ...) region stacks, got {pred.shape} and {ref.shape}")
    out = {name: dice(pred[i + 1], ref[i + 1]) for i, name in enumerate(names)}
    out["mean"] = float(np.mean([out[n] for n in names]))
    return out


def percentile_normalize(x: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """BraSyn normalisation: clip a volume to its own ``[low, high]`` percentiles (lower bound at least 0) and
    scale to [0, 1]. A constant volume maps to zeros."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.percentile(x, [low, high])
    lo = max(float(lo), 0.0)
    if hi <= lo:
        return np.zeros_like(x)
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def normalize_in_mask(x: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """The model's input normalisation, mapped to [0, 1] (paper protocol): clip to the ``percentiles`` of the
    voxels inside ``mask``, scale to [0, 1], 0 outside the mask. An empty or constant mask region maps to zeros."""
    x = np.asarray(x, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    out = np.zeros_like(x)
    if not mask.any():
        return out
    lo, hi = np.percentile(x[mask], percentiles)
    if hi > lo:
        out[mask] = (np.clip(x[mask], lo, hi) - lo) / (hi - lo)
    return out
