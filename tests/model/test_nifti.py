"""NIfTI reading: byte order, NIfTI-2, singleton 4th axis, and the non-finite voxel policy."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.io.nifti import read_nifti, write_nifti
from model.io.volume import Volume

NIBABEL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nibabel_test_data"


def test_nan_and_inf_become_background_and_are_counted(tmp_path: Path):
    data = np.ones((4, 5, 6), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    volume = read_nifti(tmp_path / "v.nii.gz")
    assert np.isfinite(volume.data).all() and volume.data[0, 0, 0] == 0 and volume.data.sum() == data.size - 3
    assert volume.meta["nonfinite_voxels"] == 3


def test_big_endian_nifti2_and_singleton_fourth_axis(tmp_path: Path):
    data = np.arange(60, dtype=">f4").reshape(3, 4, 5)
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti2Image(data[..., None], affine), tmp_path / "be.nii")
    volume = read_nifti(tmp_path / "be.nii")
    assert volume.shape == (3, 4, 5) and volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, data.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine)
    assert volume.spacing == (1.0, 2.0, 3.0)


def test_write_then_read_keeps_grid(tmp_path: Path):
    affine = np.array([[0, 0, 1.2, -90], [-0.9, 0, 0, 100], [0, 1.1, 0, -80], [0, 0, 0, 1]], float)
    original = Volume(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), affine)
    back = read_nifti(write_nifti(original, tmp_path / "o.nii.gz"))
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.data, original.data)


@pytest.mark.skipif(not NIBABEL_DATA.is_dir(), reason=f"shared sample data not found at {NIBABEL_DATA}")
def test_nibabel_edge_case_files_read_or_refuse_clearly():
    """3D files read with a finite affine; 4D files are refused with a ValueError naming the shape."""
    for path in sorted(NIBABEL_DATA.glob("*.nii*")):
        if len(nib.load(path).shape) == 3:
            volume = read_nifti(path)
            assert np.isfinite(volume.data).all(), path
        else:
            with pytest.raises(ValueError, match="3D"):
                read_nifti(path)
