"""Volumes <-> model slices (spec "Pre- and post-processing"). numpy only: no torch here.

0. (inference, ``align=True``) inputs on other grids in the same physical space are resampled onto the reference
   input's grid; with ``train_spacing`` the study is resampled to the checkpoint's training voxel size (same
   orientation and field of view) and the results are resampled back onto the reference grid by
   :func:`restore_volume`;
1. reorient every volume to RAS+ voxel order using its affine (BraTS cases come LPS- and RAS-stored);
2. brain mask = union over the *available* modalities of ``value > background_threshold``;
3. in-plane window of ``image_size`` squared centred on the mask's bounding box (pads or crops);
4. per volume and modality: clip to the [0.5, 99.5] percentiles inside the mask, scale to [-1, 1], background -1;
5. axial slices that contain brain, ``(S, M, H, W)``;
6. inverse: [-1, 1] -> [0, 1], 0 outside the mask, pasted back into the reference input's voxel order and affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from model.config import PreprocessConfig, canonical_modality
from model.errors import EmptyBrainError, NoInputError, StudyGeometryError, UnknownModalityError
from model.io.geometry import align_to_reference, grid_with_spacing, resample, same_grid
from model.io.volume import Volume

_RAS = axcodes2ornt(("R", "A", "S"))
SPACING_RTOL = 0.05  # voxel sizes within 5% of the training data's are used as they are (no resampling)


@dataclass(frozen=True)
class PreparedStudy:
    """A study as model input plus what :func:`restore_volume` needs to go back to the reference grid."""

    x: np.ndarray  # (S, M, H, W) float32 in [-1, 1], model modality order; absent modalities -1
    available: tuple[bool, ...]  # per model modality
    mask: np.ndarray  # (S, H, W) bool brain mask in slice space
    modalities: tuple[str, ...]
    reference: str  # the modality whose grid/affine outputs take (first available in model order)
    reference_shape: tuple[int, int, int]
    reference_affine: np.ndarray
    to_canonical: np.ndarray  # nibabel orientation transform stored -> RAS voxel order
    canonical_shape: tuple[int, int, int]
    window: tuple[int, int]  # start of the HxW window along canonical x and y (may be negative: padding)
    slice_indices: np.ndarray  # (S,) canonical z index of each slice
    intensity_range: dict[str, tuple[float, float]] = field(default_factory=dict)  # clip (lo, hi) per input
    reference_meta: dict = field(default_factory=dict)
    resampled: tuple[str, ...] = ()  # inputs resampled onto the reference grid
    work_shape: tuple[int, int, int] | None = None  # the training-spacing grid the model ran on, when not the
    work_affine: np.ndarray | None = None  # reference grid itself
    reference_mask: np.ndarray | None = None  # brain mask on the reference grid (only with a work grid)

    @property
    def brain_fraction(self) -> np.ndarray:
        """``(S,)`` fraction of each slice's window inside the brain mask."""
        return self.mask.reshape(self.mask.shape[0], -1).mean(1)

    def to_slices(self, volume: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Any array on the reference grid (e.g. a label map) -> ``(S, H, W)`` slices like ``x``."""
        volume = np.asarray(volume)
        if self.work_affine is not None and self.work_shape is not None:
            volume = resample(Volume(volume.astype(np.float32), self.reference_affine), self.work_shape,
                              self.work_affine, order=0, fill=fill).data
        canon = apply_orientation(volume, self.to_canonical)
        size = self.x.shape[-1]
        win = _extract(canon, self.window, size, fill)
        return np.ascontiguousarray(np.moveaxis(win[:, :, self.slice_indices], 2, 0))


def _extract(a: np.ndarray, start: tuple[int, int], size: int, fill: float) -> np.ndarray:
    """``a (X, Y, Z)`` -> ``(size, size, Z)`` window starting at ``start``, ``fill`` outside ``a``."""
    out = np.full((size, size, a.shape[2]), fill, dtype=a.dtype)
    (wx, wy), (nx, ny) = start, a.shape[:2]
    xs, xe, ys, ye = max(wx, 0), min(wx + size, nx), max(wy, 0), min(wy + size, ny)
    if xe > xs and ye > ys:
        out[xs - wx : xe - wx, ys - wy : ye - wy] = a[xs:xe, ys:ye]
    return out


def _check_geometry(volumes: dict[str, Volume]) -> None:
    names = list(volumes)
    ref = volumes[names[0]]
    for name in names[1:]:
        v = volumes[name]
        if v.shape != ref.shape:
            raise StudyGeometryError(
                f"{name} has shape {v.shape} but {names[0]} has {ref.shape} "
                f"({v.meta.get('source', name)}): all inputs must share one grid"
            )
        if not np.allclose(v.affine, ref.affine, atol=1e-3):
            raise StudyGeometryError(
                f"{name} affine differs from {names[0]} affine "
                f"({v.meta.get('source', name)}): inputs must be co-registered on one grid"
            )


def _work_grid(ref: Volume, train_spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """The grid at the training voxel size (``train_spacing`` per RAS axis), or None when ``ref`` is close enough."""
    ornt = io_orientation(ref.affine)
    target = [float(train_spacing[int(ornt[i, 0])]) for i in range(3)]
    if all(abs(g - t) <= SPACING_RTOL * t for g, t in zip(ref.spacing, target, strict=True)):
        return None
    return grid_with_spacing(ref.shape, ref.affine, target)


def prepare_study(volumes: dict[str, Volume], modalities: Sequence[str], cfg: PreprocessConfig, *,
                  align: bool = False, train_spacing: Sequence[float] | None = None) -> PreparedStudy:
    """Volumes keyed by modality (aliases allowed) -> model slices for a model built for ``modalities``.

    ``align=False`` (training, evaluation) refuses inputs off the reference grid; ``align=True`` (inference) resamples
    them onto it when they are in the same physical space. ``train_spacing`` (mm per RAS axis): see step 0.
    """
    modalities = tuple(modalities)
    given: dict[str, Volume] = {}
    for name, vol in volumes.items():
        key = canonical_modality(name)
        if key not in modalities:
            raise UnknownModalityError(
                f"modality {name!r} is not one this model was built for: {', '.join(modalities)}"
            )
        given[key] = vol
    if not given:
        raise NoInputError(f"no input volume given: need at least one of {', '.join(modalities)}")
    ordered = {m: given[m] for m in modalities if m in given}
    resampled: list[str] = []
    if align:
        ordered, resampled = align_to_reference(ordered)
    else:
        _check_geometry(ordered)
    reference = next(iter(ordered))
    ref_vol = ordered[reference]
    work = _work_grid(ref_vol, train_spacing) if train_spacing is not None else None
    reference_mask = None
    if work is not None:
        reference_mask = np.zeros(ref_vol.shape, dtype=bool)
        for v in ordered.values():
            reference_mask |= np.nan_to_num(np.asarray(v.data)) > cfg.background_threshold
        ordered = {m: resample(v, *work) for m, v in ordered.items()}
    work_vol = ordered[reference]

    # 1. canonical (RAS) voxel order
    to_canonical = io_orientation(work_vol.affine)
    canon = {}
    for m, v in ordered.items():
        a = apply_orientation(np.asarray(v.data, dtype=np.float32), to_canonical)
        canon[m] = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    cshape = next(iter(canon.values())).shape

    # 2. brain mask: union over the available modalities
    mask3 = np.zeros(cshape, dtype=bool)
    for a in canon.values():
        mask3 |= a > cfg.background_threshold
    if not mask3.any():
        raise EmptyBrainError(
            f"no voxel above {cfg.background_threshold} in any input "
            f"({', '.join(v.meta.get('source', m) for m, v in ordered.items())})"
        )

    # 3. in-plane window centred on the mask's bounding box
    size = cfg.image_size
    xs, ys = np.nonzero(mask3.any(axis=2))
    window = (int((xs.min() + xs.max() + 1) // 2 - size // 2), int((ys.min() + ys.max() + 1) // 2 - size // 2))
    slice_indices = np.nonzero(mask3.any(axis=(0, 1)))[0]

    # 4. intensity: percentile clip inside the mask, [-1, 1], background -1
    lo_p, hi_p = cfg.clip_percentiles
    x = np.full((len(slice_indices), len(modalities), size, size), -1.0, dtype=np.float32)
    ranges = {}
    mask_win = _extract(mask3, window, size, False)[:, :, slice_indices]
    for j, m in enumerate(modalities):
        if m not in canon:
            continue
        a = canon[m]
        lo, hi = (float(v) for v in np.percentile(a[mask3], [lo_p, hi_p]))
        if hi <= lo:
            hi = lo + 1.0
        ranges[m] = (lo, hi)
        scaled = np.where(mask3, (np.clip(a, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0, -1.0)
        scaled = np.clip(scaled, -1.0, 1.0).astype(np.float32)  # float rounding may overshoot by 1 ulp
        win = _extract(scaled, window, size, -1.0)[:, :, slice_indices]
        x[:, j] = np.moveaxis(win, 2, 0)

    # 5. slices
    return PreparedStudy(
        x=x,
        available=tuple(m in canon for m in modalities),
        mask=np.ascontiguousarray(np.moveaxis(mask_win, 2, 0)),
        modalities=modalities,
        reference=reference,
        reference_shape=tuple(int(s) for s in ref_vol.shape),  # type: ignore[arg-type]
        reference_affine=ref_vol.affine.copy(),
        to_canonical=to_canonical,
        canonical_shape=tuple(int(s) for s in cshape),  # type: ignore[arg-type]
        window=window,
        slice_indices=slice_indices,
        intensity_range=ranges,
        reference_meta=dict(ref_vol.meta),
        resampled=tuple(resampled),
        work_shape=work[0] if work else None,
        work_affine=work[1] if work else None,
        reference_mask=reference_mask,
    )


def restore_volume(slices: np.ndarray, prepared: PreparedStudy, *, unit_range: bool = False) -> Volume:
    """``(S, H, W)`` slices in [-1, 1] -> Volume on the reference input's grid, float32 in [0, 1], 0 outside the mask.

    ``unit_range=True`` takes slices already in [0, 1] (e.g. a standard-deviation map) and only masks/pastes them.
    """
    slices = np.asarray(slices, dtype=np.float32)
    if slices.shape != prepared.mask.shape:
        raise ValueError(f"slices have shape {slices.shape}, expected {prepared.mask.shape}")
    values = slices if unit_range else (np.clip(slices, -1.0, 1.0) + 1.0) / 2.0
    values = np.where(prepared.mask, values, 0.0).astype(np.float32)
    canon = np.zeros(prepared.canonical_shape, dtype=np.float32)
    size = slices.shape[-1]
    (wx, wy), (nx, ny, _) = prepared.window, prepared.canonical_shape
    xs, xe, ys, ye = max(wx, 0), min(wx + size, nx), max(wy, 0), min(wy + size, ny)
    block = np.moveaxis(values, 0, 2)  # (H, W, S)
    canon[xs:xe, ys:ye, prepared.slice_indices] = block[xs - wx : xe - wx, ys - wy : ye - wy]
    back = ornt_transform(_RAS, prepared.to_canonical)
    data = np.ascontiguousarray(apply_orientation(canon, back), dtype=np.float32)
    if prepared.work_affine is not None and not same_grid(data.shape, prepared.work_affine,
                                                          prepared.reference_shape, prepared.reference_affine):
        data = resample(Volume(data, prepared.work_affine), prepared.reference_shape, prepared.reference_affine).data
        if prepared.reference_mask is not None:
            data = np.where(prepared.reference_mask, data, np.float32(0))
    if data.shape != prepared.reference_shape:  # cannot happen for a consistent PreparedStudy
        raise ValueError(f"restored shape {data.shape} differs from the reference shape {prepared.reference_shape}")
    meta = {"reference": prepared.reference, "reference_source": prepared.reference_meta.get("source")}
    return Volume(data=data, affine=prepared.reference_affine.copy(), meta=meta)
