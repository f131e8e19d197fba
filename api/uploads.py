"""Uploaded files: checked in a resource-limited child (header first, then one bounded pass over the voxels),
hashed, streamed to storage.

The check refuses, with the codes of docs/errors.md: files that are not NIfTI-1/2, headers that are not 3D or
claim more voxels than allowed (before anything is allocated), data types the model cannot read, truncated
files, gzip streams that inflate past what the header declares (gzip bombs), and volumes without a single finite
non-zero voxel (NaN-filled, empty). It never holds more than one block of voxels in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.volumeutils import endian_codes

from api.core.errors import ProblemError
from api.core.sandbox import Rejected, SandboxError, run_limited
from api.core.settings import get_settings

GZIP_MAGIC = b"\x1f\x8b"
BLOCK = 1024 * 1024
MAX_VOX_OFFSET = 16 * 1024 * 1024  # header extensions beyond this are not a brain MRI's


@dataclass(frozen=True)
class VolumeHeader:
    shape: tuple[int, ...]
    affine: np.ndarray


def _read_header(head: bytes) -> nib.Nifti1Header:
    """The fixed-size header only (extensions are skipped, never parsed); sizeof_hdr picks NIfTI-1 or -2 as
    nibabel.load does, so that what passes here is what the worker's reader reads."""
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        if size not in sizes or len(head) < size:
            continue
        try:
            return klass(binaryblock=head[:size], check=True)
        except Exception:  # noqa: BLE001 - nibabel raises several types for a bad header
            break
    raise Rejected("invalid_nifti", "not a NIfTI-1 or NIfTI-2 file")


def _check_header(header: nib.Nifti1Header, max_voxels: int) -> tuple[tuple[int, ...], np.dtype, int, int]:
    shape = tuple(int(d) for d in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise Rejected("not_3d", f"a 3D volume is needed, the header says shape {shape}")
    voxels = shape[0] * shape[1] * shape[2]  # Python ints: NIfTI-2 dims cannot overflow
    if min(shape) < 1 or voxels > max_voxels:
        raise Rejected("volume_too_large", f"shape {shape} is outside the accepted size (at most {max_voxels} voxels)")
    try:
        dtype = header.get_data_dtype()
    except Exception:  # noqa: BLE001 - an unknown datatype code
        dtype = np.dtype("V1")
    if dtype.kind not in "uif" or dtype.fields:
        raise Rejected("unsupported_datatype", f"voxel type {dtype} is not supported (integers or floats only)")
    offset = int(header.get_data_offset())
    if not 0 <= offset <= MAX_VOX_OFFSET:
        raise Rejected("invalid_nifti", f"the voxel data offset {offset} is out of range")
    affine = header.get_best_affine()
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise Rejected("invalid_affine", "the affine is not finite and invertible")
    return shape, dtype, offset, voxels


def _check_extensions(header: nib.Nifti1Header, start: bytes, offset: int) -> None:
    """Parse the header extensions exactly as ``nibabel.load`` does (its own parser, on the bytes up to the voxel
    offset), so that a file accepted here is a file the worker can open."""
    size = int(header.sizeof_hdr)
    flag = start[size:size + 4]  # `start` holds at least the 540 bytes read for the header, whatever the offset
    if len(flag) < 4 or flag[:1] == b"\0":
        return  # no extensions
    if offset < size + 4:
        raise Rejected("invalid_nifti", f"header extensions are flagged but the voxel data start at byte {offset}")
    byteswap = endian_codes["native"] != header.endianness
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel warns about sizes that are not multiples of 16
            type(header).exts_klass.from_fileobj(io.BytesIO(start[size + 4:offset]), offset - size - 4, byteswap)
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for a malformed extension
        raise Rejected("invalid_nifti", f"malformed header extension ({exc})") from None


def _scan(f: BinaryIO, max_voxels: int) -> dict:
    """The sandboxed check of one file: returns {shape, affine} or raises Rejected."""
    f.seek(0)
    magic = f.read(2)
    f.seek(0)
    if not magic:
        raise Rejected("empty_file", "the file is empty")
    stream: BinaryIO = gzip.GzipFile(fileobj=f, mode="rb") if magic == GZIP_MAGIC else f  # type: ignore[assignment]
    try:
        head = stream.read(540)
        header = _read_header(head)
        shape, dtype, offset, voxels = _check_header(header, max_voxels)
        parts = [head]
        read = len(head)
        while read < offset:  # the header extensions, checked below as the worker's nibabel.load will parse them
            part = stream.read(min(BLOCK, offset - read))
            if not part:
                break
            parts.append(part)
            read += len(part)
        _check_extensions(header, b"".join(parts), offset)
        expected = voxels * dtype.itemsize
        block = head[offset:offset + expected]  # voxel bytes that were read with the header, if any
        seen, useful, carry = len(block), 0, b""
        while True:
            block = carry + block
            usable = len(block) - len(block) % dtype.itemsize
            carry = block[usable:]
            if not useful and usable:
                values = np.frombuffer(block[:usable], dtype=dtype)
                useful = int(np.count_nonzero(np.isfinite(values) & (values != 0)))
            if seen >= expected or not (block := stream.read(min(BLOCK, expected - seen))):
                break
            seen += len(block)
        if read < offset or seen < expected:
            raise Rejected("truncated_file", f"the file ends after {seen} of the {expected} voxel bytes its header "
                                             f"declares")
        if len(stream.read(BLOCK + 1)) > BLOCK:  # a little padding is tolerated, an inflating stream is not
            raise Rejected("decompressed_too_large", "the file holds far more data than its header declares "
                                                     "(a decompression bomb?)")
    except (OSError, EOFError, zlib.error) as exc:
        raise Rejected("invalid_nifti", f"the gzip stream is corrupt ({type(exc).__name__})") from exc
    if not useful:
        raise Rejected("empty_volume", "the volume has no finite non-zero voxel (all NaN, Inf or 0)")
    return {"shape": list(shape), "affine": np.asarray(header.get_best_affine(), dtype=float).tolist()}


def inspect_nifti(field: str, f: BinaryIO) -> VolumeHeader:
    """Check one uploaded NIfTI in the sandbox; a refusal is a 422 problem naming ``field``."""
    api = get_settings().api
    try:
        out = run_limited(_scan, f, api.max_volume_voxels, memory_bytes=api.parse_memory_bytes,
                          cpu_seconds=api.parse_cpu_seconds, timeout=api.parse_timeout_seconds)
    except (Rejected, SandboxError) as exc:
        raise ProblemError(getattr(exc, "status", 422), exc.code, f"{field}: {exc.detail}", field=field) from None
    finally:
        f.seek(0)
    return VolumeHeader(shape=tuple(out["shape"]), affine=np.asarray(out["affine"]))


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
