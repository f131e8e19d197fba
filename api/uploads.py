"""Uploaded files: checked from the header (before any voxel is read), hashed, streamed to storage."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import nibabel as nib
import numpy as np

from api.errors import ProblemError

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class StoredInput:
    key: str
    sha256: str
    bytes: int
    shape: tuple[int, ...]


def _invalid(field: str, detail: str, code: str = "invalid_nifti") -> ProblemError:
    return ProblemError(422, code, f"{field}: {detail}", field=field)


def inspect_nifti_header(field: str, f: BinaryIO, *, max_voxels: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Read only the NIfTI-1/2 header (through gzip when compressed) and refuse what the worker cannot use;
    returns the shape and the affine."""
    f.seek(0)
    magic = f.read(2)
    f.seek(0)
    if not magic:
        raise _invalid(field, "the file is empty", "empty_file")
    stream: BinaryIO = gzip.GzipFile(fileobj=f, mode="rb") if magic == GZIP_MAGIC else f  # type: ignore[assignment]
    try:
        head = stream.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise _invalid(field, f"the gzip stream is corrupt ({type(exc).__name__})") from exc
    finally:
        f.seek(0)
    header = None
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        if len(head) < size:
            continue
        try:  # the fixed-size header only: extensions and voxels are the worker's business
            header = klass(binaryblock=head[:size], check=True)
            break
        except Exception:  # noqa: BLE001 - nibabel raises several types for a bad header
            continue
    if header is None:
        raise _invalid(field, "not a NIfTI-1 or NIfTI-2 file")
    shape = tuple(int(d) for d in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise _invalid(field, f"a 3D volume is needed, the header says shape {shape}", "not_3d")
    if min(shape) < 1 or int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise _invalid(field, f"shape {shape} is outside the accepted size (at most {max_voxels} voxels)",
                       "volume_too_large")
    try:
        dtype = header.get_data_dtype()
    except Exception:  # noqa: BLE001 - an unknown datatype code
        dtype = None
    if dtype is None or dtype.kind not in "iuf" or dtype.fields is not None:
        raise _invalid(field, f"voxel datatype {dtype} is not supported (integer or float scalars only)",
                       "unsupported_datatype")
    affine = header.get_best_affine()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise _invalid(field, "the affine is not finite and invertible", "invalid_affine")
    return shape, affine


def check_same_space(grids: dict[str, tuple[tuple[int, ...], np.ndarray]], min_overlap: float = 0.5) -> None:
    """Inputs on other grids are resampled by the worker, but only within one physical space: refuse inputs whose
    world bounding boxes overlap less than ``min_overlap`` of the smaller one (the worker's rule, from headers)."""

    def box(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
        world = affine[:3, :3] @ corners + affine[:3, 3:4]
        return world.min(axis=1), world.max(axis=1)

    names = list(grids)
    if len(names) < 2:
        return
    (lo_r, hi_r) = box(*grids[names[0]])
    for name in names[1:]:
        lo, hi = box(*grids[name])
        inter = np.clip(np.minimum(hi, hi_r) - np.maximum(lo, lo_r), 0, None).prod()
        smaller = min((hi - lo).prod(), (hi_r - lo_r).prod())
        if inter < min_overlap * smaller:
            raise ProblemError(422, "grid_mismatch", f"{name} does not overlap {names[0]} in world space "
                               f"({inter / smaller:.0%} of the smaller field of view): not one physical space",
                               fields=[names[0], name])


def hash_upload(f: BinaryIO) -> tuple[str, int]:
    """SHA-256 and size of an uploaded file, read once in blocks; the file is left at its start."""
    digest = hashlib.sha256()
    f.seek(0)
    while block := f.read(1024 * 1024):
        digest.update(block)
    size = f.tell()
    f.seek(0)
    return digest.hexdigest(), size
