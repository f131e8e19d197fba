"""DICOM output: every written series passes dciodvfy (dicom3tools) without errors and dcm2niix converts it back to
the same volume on the same grid (within 0.05 mm); study, frame of reference, UIDs and provenance attributes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest

from model.io.dicom import read_series
from model.io.dicom_write import MAX_STORED, SyntheticSeries, write_dicom_series
from model.io.volume import Volume
from tests.dicom_tools import dciodvfy_errors, dcm2niix_volume, on_source_slices

from .conftest import DATA

SAGITTAL = DATA / "dicom_dcm_qa_decubitus_HFS_t1_fl2d_sag"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s, (i, j) = np.cos(np.radians(degrees)), np.sin(np.radians(degrees)), [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = _rotation(2, 20) @ _rotation(0, -15) @ np.array([[0.0, 0, 1.2, -60], [-0.9, 0, 0, 100], [0, 1.1, 0, -40],
                                                            [0, 0, 0, 1]])


def assert_same_image(back: nib.Nifti1Image, volume: Volume) -> None:
    """dcm2niix's NIfTI and ours hold the same voxel values at the same world positions (0.05 mm)."""
    ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.affine))
    theirs = nib.as_closest_canonical(back)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=0.05)
    expected = np.rint(np.asarray(ours.dataobj, dtype=np.float64) * MAX_STORED)  # the writer's arithmetic
    np.testing.assert_array_equal(np.asarray(theirs.dataobj, dtype=np.float64), expected)


def _synthetic(shape: tuple[int, int, int], affine: np.ndarray) -> Volume:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    data = np.clip(1 - (x**2 + (y / 0.8) ** 2 + (z / 0.9) ** 2), 0, 1) * (1 + 0.3 * x)  # asymmetric: flips show
    return Volume(np.clip(data, 0, 1).astype(np.float32), affine)


@pytest.fixture(scope="module")
def sagittal() -> Volume:
    if not SAGITTAL.is_dir():
        pytest.skip(f"sample series {SAGITTAL} is absent")
    return read_series(sorted(SAGITTAL.glob("*.dcm")))


def _series(modality: str = "flair", sources=()) -> SyntheticSeries:
    return SyntheticSeries(modality=modality, model_version="msgldm-tiny-test", uid_seed="job-1",
                           derivation=f"Synthesized {modality.upper()} from T1 by MSG-LDM test", sources=list(sources))


def test_output_on_the_sagittal_reference_grid(sagittal, tmp_path):
    info = sagittal.meta["dicom"]
    output = _synthetic(sagittal.shape, sagittal.affine)
    sources = [[(info["sop_class_uid"], uid)] for uid in info["sop_instance_uids"]]
    paths = write_dicom_series(output, tmp_path / "out", _series(sources=sources), info)
    assert len(paths) == 35
    for path in (paths[0], paths[17], paths[-1]):
        assert dciodvfy_errors(path) == [], path
    assert_same_image(dcm2niix_volume(tmp_path / "out", tmp_path), output)

    ((_, src),) = on_source_slices([paths[5]], SAGITTAL.glob("*.dcm"))  # slice 6 sits on a source slice
    ds = pydicom.dcmread(paths[5])
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    iop = [np.array(d.ImageOrientationPatient, float) for d in (ds, src)]
    np.testing.assert_allclose(*iop, atol=1e-5)
    np.testing.assert_allclose(np.array(ds.PixelSpacing, float), np.array(src.PixelSpacing, float), atol=1e-5)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds[0x0008, 0x001C].value == "YES"
    assert "SYNTHETIC" in ds.SeriesDescription and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
    item = ds.ContributingEquipmentSequence[0]
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109100" and item.ManufacturerModelName == "MSG-LDM"
    assert "msgldm-tiny-test" in item.SoftwareVersions
    assert ds.DerivationDescription.startswith("Synthesized FLAIR") and float(ds.WindowWidth) > 0
    for acquisition in ("RepetitionTime", "EchoTime", "FlipAngle", "SequenceName", "ReceiveCoilName"):
        assert not ds.get(acquisition), acquisition  # never copied from the T1 acquisition
    assert ds.ScanningSequence == "RM" and ds.PatientPosition == src.PatientPosition


def test_uids_are_deterministic_per_job(sagittal, tmp_path):
    info = sagittal.meta["dicom"]
    output = _synthetic(sagittal.shape, sagittal.affine)
    a = write_dicom_series(output, tmp_path / "a", _series(), info)
    b = write_dicom_series(output, tmp_path / "b", _series(), info)
    c = write_dicom_series(output, tmp_path / "c", _series("t2"), info)
    uids = [[(d.SeriesInstanceUID, d.SOPInstanceUID) for d in map(pydicom.dcmread, paths)] for paths in (a, b, c)]
    assert uids[0] == uids[1] and uids[0][0][0] != uids[2][0][0] and len({u for _, u in uids[0]}) == 35


def test_off_grid_volume_is_refused(sagittal, tmp_path):
    shifted = sagittal.affine.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(ValueError, match="not on the grid"):
        write_dicom_series(_synthetic(sagittal.shape, shifted), tmp_path, _series(), sagittal.meta["dicom"])


@pytest.mark.parametrize("affine", [np.diag([-1.0, -1.0, 1.2, 1.0]), np.diag([1.0, 1.0, 1.0, 1.0]), OBLIQUE],
                         ids=["lps", "ras", "oblique"])
def test_nifti_only_new_study_round_trips(tmp_path, affine):
    """Without a DICOM reference: a new study with the minimal patient module, any orientation."""
    output = _synthetic((20, 24, 9), affine)
    paths = write_dicom_series(output, tmp_path / "out", _series())
    assert dciodvfy_errors(paths[4]) == []
    assert_same_image(dcm2niix_volume(tmp_path / "out", tmp_path), output)
    ds = pydicom.dcmread(paths[0])
    assert ds.PatientID == "MSGLDM-job-1" and ds.StudyInstanceUID and ds.FrameOfReferenceUID
    assert "SourceImageSequence" not in ds
    back = read_series(paths)  # and our own reader agrees (slices come back in +normal order, whichever was written)
    ours, theirs = (nib.as_closest_canonical(nib.Nifti1Image(v.data, v.affine)) for v in (output, back))
    np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-4)
    expected = np.rint(np.asarray(ours.dataobj, np.float64) * MAX_STORED)
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), expected)
