"""NIfTI files <-> Volume (nibabel)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from model.io.volume import Volume


def read_nifti(path: str | Path) -> Volume:
    """Read a 3D NIfTI-1/2 file as float32 in its stored voxel order (any byte order), with its affine.

    Policy for non-finite voxels: NaN and +-Inf become 0 (background), and their count is kept in
    ``meta["nonfinite_voxels"]`` so that the job record reports it.
    """
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    bad = ~np.isfinite(data)
    nonfinite = int(bad.sum())
    if nonfinite:
        data = np.where(bad, np.float32(0), data)
    return Volume(data=data, affine=img.affine, meta={"source": str(path), "nonfinite_voxels": nonfinite})


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write ``volume`` as a float32 NIfTI-1 file (gzip when the name ends in .gz)."""
    img = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), volume.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    nib.save(img, str(path))
    return Path(path)
