"""The DICOM conformance tools the tests check written series with: dciodvfy (dicom3tools) and dcm2niix, and the
match of every written slice to the acquired slice it sits on. One copy for the model's writer tests and the
service's round trips."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

# dicom3tools 1.00~20220618 (Debian bookworm/trixie) predates SyntheticData (0008,001C) in its dictionary and reports
# the attribute itself as an unknown even-group tag. That one line is tolerated; every other error fails.
UNKNOWN_SYNTHETIC_DATA = "Attribute with an even group number is not a recognized standard attribute - (0x0008,0x001c)"


def require_tools(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed (Debian packages dicom3tools, dcm2niix; .ci/run installs them)")


def dciodvfy_errors(path: Path) -> list[str]:
    require_tools("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") and UNKNOWN_SYNTHETIC_DATA not in line]


def dcm2niix_volume(folder: Path, tmp: Path) -> nib.Nifti1Image:
    """dcm2niix's reading of a written series, as a NIfTI image."""
    require_tools("dcm2niix")
    out = tmp / "d2n"
    out.mkdir()
    subprocess.run(["dcm2niix", "-o", str(out), "-f", "back", "-z", "n", str(folder)], check=True,
                   capture_output=True)
    (nifti,) = out.glob("back*.nii")
    return nib.load(nifti)


def _position(ds: pydicom.Dataset, decimals: int) -> tuple[float, ...]:
    return tuple(np.round(np.array(ds.ImagePositionPatient, float), decimals))


def on_source_slices(written: Iterable[Path], sources: Iterable[Path],
                     decimals: int = 3) -> list[tuple[pydicom.Dataset, pydicom.Dataset]]:
    """Each written slice's header with the acquired slice's at the same position (rounded to `decimals` mm);
    a KeyError names a written slice that sits on no acquired one."""
    by_position = {_position(s, decimals): s for s in (pydicom.dcmread(p, stop_before_pixels=True) for p in sources)}
    pairs = []
    for path in written:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        pairs.append((ds, by_position[_position(ds, decimals)]))
    return pairs
