"""DICOM reading: the real sagittal series against dcm2niix, slice order, rescale, compressed transfer syntaxes,
the refusals (each with its documented code), and a property test: mutated files give a Volume or a documented
DicomError, never anything else."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from api.core.errors import ProblemError
from api.core.settings import DicomSettings
from api.dicom import inspect_dicom_upload
from model.io import dicom
from model.io.dicom import DicomError, read_series

from .conftest import DATA, MODS

SAGITTAL = DATA / "dicom_dcm_qa_decubitus_HFS_t1_fl2d_sag"
MR_SMALL = DATA / "pydicom_test_files" / "MR_small.dcm"
NIBABEL_DATA = DATA / "nibabel_test_data"
ERRORS_DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
requires_sagittal = pytest.mark.skipif(not SAGITTAL.is_dir(), reason=f"sample series {SAGITTAL} is absent")
requires_small = pytest.mark.skipif(not MR_SMALL.is_file(), reason=f"sample file {MR_SMALL} is absent")


def documented_codes() -> set[str]:
    return set(re.findall(r"`([a-z0-9_]+)`", ERRORS_DOC.read_text()))


def make_series(tmp: Path, n: int = 4, *, step=(0.0, 0.0, 2.5), iop=(1, 0, 0, 0, 1, 0), name: str = "s",
                **overrides) -> list[Path]:
    """``n`` slices of MR_small stacked along ``step``; files written in reverse order (the reader must sort)."""
    template = pydicom.dcmread(MR_SMALL)
    base = template.pixel_array.astype(np.int16)
    series_uid, origin = generate_uid(entropy_srcs=[name]), np.array([-83.9, -91.2, 6.6])  # same bytes each call
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid(entropy_srcs=[name, str(k)])
        ds.InstanceNumber = n - k  # deliberately not the geometric order
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * np.asarray(step)]
        ds.PixelData = (base + 100 * k).tobytes()
        for key, value in overrides.items():
            setattr(ds, key, value)
        path = out / f"{n - k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


@requires_sagittal
def test_sagittal_series_matches_dcm2niix(tmp_path):
    """Same voxels in the same world positions as dcm2niix (a converter nobody here wrote), within 0.05 mm."""
    if shutil.which("dcm2niix") is None:
        pytest.skip("dcm2niix is not installed (Debian package dcm2niix; .ci/run installs it)")
    volume = read_series(sorted(SAGITTAL.glob("*.dcm"))[::-1])  # file order must not matter
    subprocess.run(["dcm2niix", "-o", str(tmp_path), "-f", "ref", "-z", "n", str(SAGITTAL)], check=True,
                   capture_output=True)
    ref = nib.as_closest_canonical(nib.load(tmp_path / "ref.nii"))
    ours = nib.as_closest_canonical(nib.Nifti1Image(volume.data, volume.affine))
    assert ours.shape == ref.shape == (35, 256, 256)
    np.testing.assert_allclose(ours.affine, ref.affine, atol=0.05)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj, dtype=np.float32))
    assert nib.aff2axcodes(volume.affine) == ("P", "I", "R")  # sagittal slices, stored as acquired
    info = volume.meta["dicom"]
    assert info["series_description"] == "t1_fl2d_sag" and len(info["sop_instance_uids"]) == 35
    assert info["study"]["StudyInstanceUID"] and info["frame_of_reference_uid"]


@requires_small
def test_sorted_along_the_normal_with_rescale(tmp_path):
    paths = make_series(tmp_path, RescaleSlope="2", RescaleIntercept="-5")
    volume = read_series(paths)
    base = pydicom.dcmread(MR_SMALL).pixel_array.astype(np.float32)
    assert volume.shape == (64, 64, 4)
    for k in range(4):  # slice k is the k-th position along the normal, whatever InstanceNumber says
        np.testing.assert_array_equal(volume.data[:, :, k], ((base + 100 * k) * 2 - 5).T)
    # LPS -> RAS: x and y flip sign; pixel spacing and the measured 2.5 mm step are the column lengths
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([-0.3125, -0.3125, 2.5]), atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 3], [83.9, 91.2, 6.6], atol=1e-4)


@requires_small
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, "deflated"])
def test_compressed_transfer_syntaxes_decode_to_the_same_volume(tmp_path, syntax):
    paths = make_series(tmp_path)
    expected = read_series(paths).data
    for p in paths:
        ds = pydicom.dcmread(p)
        if syntax == "deflated":
            ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        else:
            ds.compress(syntax)
        ds.save_as(p)
    np.testing.assert_array_equal(read_series(paths).data, expected)


def _mutate(paths: list[Path], fn) -> list[Path]:
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        fn(k, ds)
        ds.save_as(p)
    return paths


REFUSALS = {
    "dicom_not_mr": lambda k, ds: setattr(ds, "Modality", "CT"),
    "dicom_mosaic": lambda k, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]),
    "dicom_4d": lambda k, ds: setattr(ds, "ImagePositionPatient", [0, 0, float(k // 2)]),  # two per position
    "dicom_nonuniform_spacing": lambda k, ds: setattr(ds, "ImagePositionPatient", [0, 0, [0, 1, 2, 4.5][k]]),
    "dicom_gantry_tilt": lambda k, ds: setattr(ds, "ImagePositionPatient", [0, 0.5 * k, 2.0 * k]),
    "dicom_no_pixel_data": lambda k, ds: k == 1 and delattr(ds, "PixelData"),
    "dicom_bad_geometry": lambda k, ds: k == 2 and setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, 1]),
}


@requires_small
@pytest.mark.parametrize("code", list(REFUSALS))
def test_refusals_have_their_code_and_name_the_series(tmp_path, code):
    paths = _mutate(make_series(tmp_path, SeriesDescription="t2_tse_tra", SeriesNumber="7"), REFUSALS[code])
    with pytest.raises(DicomError) as err:
        read_series(paths)
    assert err.value.code == code and "series 7 't2_tse_tra'" in str(err.value)
    assert code in documented_codes()


@pytest.mark.skipif(not (NIBABEL_DATA / "0.dcm").is_file(), reason="nibabel's mosaic DICOM files are absent")
def test_real_siemens_mosaic_is_refused():
    with pytest.raises(dicom.MosaicError, match="CBU_DTI_64D_1A"):
        read_series([NIBABEL_DATA / "0.dcm", NIBABEL_DATA / "1.dcm"])


@requires_small
def test_two_series_and_garbage_are_refused(tmp_path):
    a, b = make_series(tmp_path, name="a"), make_series(tmp_path, name="b")
    with pytest.raises(DicomError, match="2 series"):
        read_series(a + b)
    assert set(dicom.read_dicom(a + b)) == {pydicom.dcmread(a[0]).SeriesInstanceUID,
                                             pydicom.dcmread(b[0]).SeriesInstanceUID}
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all" * 10)
    with pytest.raises(dicom.NotDicomError) as err:
        read_series([tmp_path / "junk.dcm"])
    assert err.value.code == "invalid_dicom"


@requires_small
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_give_a_volume_or_a_documented_error(tmp_path_factory, data):
    """Random byte flips, truncations and header edits: the reader either reads or raises a DicomError whose code is
    in docs/errors.md (the worker maps it to the job's error.code), and the API's inspection either accepts or
    answers a documented 422 code; nothing else escapes either."""
    paths = make_series(tmp_path_factory.mktemp("mut"), n=3, SeriesDescription="t1_se_tra")
    victim = paths[data.draw(st.integers(0, 2), label="file")]
    raw = bytearray(victim.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "truncate", "header"]), label="kind")
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 20), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        victim.write_bytes(bytes(raw))
    elif kind == "truncate":
        victim.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]))
    else:
        ds = pydicom.dcmread(victim)
        keyword = data.draw(st.sampled_from(["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                                             "Rows", "Columns", "BitsAllocated", "RescaleSlope", "SeriesInstanceUID",
                                             "SamplesPerPixel", "NumberOfFrames"]), label="keyword")
        value = data.draw(st.sampled_from([None, "", "0", "-1", "nan", "1\\2", "65535", "abc"]), label="value")
        try:
            if value is None:
                delattr(ds, keyword) if keyword in ds else None
            else:
                setattr(ds, keyword, value)
            ds.save_as(victim)
        except Exception:  # noqa: BLE001 - pydicom refused to even write this value: nothing to test
            return
    try:
        volume = read_series(paths)  # the worker's reader
    except DicomError as exc:
        assert exc.code in documented_codes(), exc
    else:
        assert volume.data.ndim == 3 and np.isfinite(volume.affine).all()
    with ExitStack() as files:  # the API's header-only inspection of the same files
        opened = [(p.name, files.enter_context(open(p, "rb"))) for p in paths]
        try:
            inspect_dicom_upload(opened, modalities=MODS, series_map=None, cfg=DicomSettings(),
                                 max_voxels=10**8).close()
        except ProblemError as exc:
            assert exc.code in documented_codes(), exc
