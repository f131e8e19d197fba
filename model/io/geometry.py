"""Voxel grids in world space: compare them, measure their overlap, resample between them (numpy + scipy).

A grid is a ``shape`` and a voxel-to-world ``affine`` (RAS+ mm, NIfTI convention). DICOM's patient space is LPS:
``LPS_TO_RAS @ affine_lps`` converts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from model.errors import StudyGeometryError
from model.io.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GRID_ATOL_MM = 1e-3  # two affines within this (mm, and mm per voxel) describe the same grid


def same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray,
              atol: float = GRID_ATOL_MM) -> bool:
    return tuple(shape_a) == tuple(shape_b) and bool(np.allclose(affine_a, affine_b, atol=atol))


def world_box(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (min, max corners, mm) of a grid's voxels (their outer edges)."""
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def overlap_fraction(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int],
                     affine_b: np.ndarray) -> float:
    """Volume of the intersection of the two world boxes over the smaller box (0: disjoint, 1: one inside).
    The API applies the same rule to NIfTI headers (``api.uploads.check_same_space``)."""
    (lo_a, hi_a), (lo_b, hi_b) = world_box(shape_a, affine_a), world_box(shape_b, affine_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    smaller = min((hi_a - lo_a).prod(), (hi_b - lo_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def resample(volume: Volume, shape: Sequence[int], affine: np.ndarray, order: int = 1, fill: float = 0.0) -> Volume:
    """``volume`` sampled on the grid ``(shape, affine)`` (trilinear by default; ``fill`` outside the source)."""
    shape = tuple(int(s) for s in shape)
    if same_grid(volume.shape, volume.affine, shape, affine):
        return Volume(np.asarray(volume.data, dtype=np.float32), affine, dict(volume.meta))
    target_to_source = np.linalg.inv(volume.affine) @ np.asarray(affine, dtype=np.float64)
    source = np.nan_to_num(np.asarray(volume.data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    data = ndimage.affine_transform(source, target_to_source[:3, :3],
                                    offset=target_to_source[:3, 3], output_shape=shape, order=order,
                                    mode="constant", cval=fill, prefilter=False)
    return Volume(data.astype(np.float32, copy=False), affine, dict(volume.meta))


def grid_with_spacing(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid with the same orientation and field of view as ``(shape, affine)`` but voxel size ``spacing`` (mm per
    array axis). The first voxel centre moves so that both grids cover the same extent, centred."""
    old = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    new = np.asarray(spacing, dtype=np.float64)
    extent = old * np.asarray(shape)
    new_shape = np.maximum(1, np.round(extent / new)).astype(int)
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = affine[:3, :3] / old * new
    # the centre of the field of view stays put: world of voxel (n-1)/2 in both grids
    centre_old = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    out[:3, 3] = centre_old - out[:3, :3] @ ((new_shape - 1) / 2)
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), out


def align_to_reference(volumes: dict[str, Volume], min_overlap: float = 0.5) -> tuple[dict[str, Volume], list[str]]:
    """Every volume on the first one's grid: those already on it unchanged, the others resampled (trilinear).

    Returns the aligned volumes and the names that were resampled. Volumes that are not in the same physical space
    as the reference (different DICOM frame of reference, or world boxes overlapping less than ``min_overlap`` of the
    smaller one) raise :class:`StudyGeometryError` naming both.
    """
    names = list(volumes)
    ref_name, ref = names[0], volumes[names[0]]
    out, resampled = {ref_name: ref}, []
    for name in names[1:]:
        v = volumes[name]
        for_ref, for_v = ref.meta.get("frame_of_reference_uid"), v.meta.get("frame_of_reference_uid")
        if for_ref and for_v and for_ref != for_v:
            raise StudyGeometryError(f"{name} ({v.meta.get('source', name)}) has frame of reference {for_v}, "
                                     f"{ref_name} has {for_ref}: they are not in one physical space")
        if same_grid(v.shape, v.affine, ref.shape, ref.affine):
            out[name] = v
            continue
        frac = overlap_fraction(v.shape, v.affine, ref.shape, ref.affine)
        if frac < min_overlap:
            raise StudyGeometryError(f"{name} ({v.meta.get('source', name)}) overlaps {ref_name} by {frac:.0%} of "
                                     f"the smaller field of view: they are not in one physical space")
        out[name] = resample(v, ref.shape, ref.affine)
        resampled.append(name)
    return out, resampled
