"""DICOM through the API: zip safety, the series -> modality mapping and its refusals (in-process, embedded stack),
nibabel's edge-case files (accepted and read by the worker's reader, or refused with their code), and the real
sagittal series end to end through uvicorn + a Celery worker on PostgreSQL + Redis + S3: its synthesized series
lands on its grid, in its study and frame of reference, passes dciodvfy and converts back with dcm2niix."""

from __future__ import annotations

import gzip
import io
import re
import stat
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.dicom_tools import dciodvfy_errors, dcm2niix_volume, on_source_slices, require_tools
from tests.service.conftest import DATA, ROOT, create_key, wait_for_job
from tests.service.test_api import assert_problem, auth
from tests.service.test_api import create_key as create_key_in_process

SAGITTAL = DATA / "dicom_dcm_qa_decubitus_HFS_t1_fl2d_sag"
NIBABEL_DATA = DATA / "nibabel_test_data"
ERRORS_DOC = ROOT / "docs" / "errors.md"
requires_sagittal = pytest.mark.skipif(not SAGITTAL.is_dir(), reason=f"sample series {SAGITTAL} is absent")
# dicom3tools 1.00~20220618 does not know SyntheticData (0008,001C) yet (see tests/model/test_dicom_write.py)
FEW = slice(0, 3)  # the API checks headers only: three slices of the series exercise every rule


def sagittal_zip(description: str | None = None, series_number: int | None = None, uid: str | None = None,
                 slices: slice = slice(None), **changes) -> bytes:
    """The real sagittal series as a zip, optionally relabelled as another series."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(SAGITTAL.glob("*.dcm"))[slices]:
            if description is None and series_number is None and uid is None and not changes:
                zf.write(path, f"study/{path.name}")
                continue
            ds = pydicom.dcmread(path)
            if description is not None:
                ds.SeriesDescription = ds.ProtocolName = description
            if series_number is not None:
                ds.SeriesNumber = series_number
            if uid is not None:
                ds.SeriesInstanceUID = uid
            for key, value in changes.items():
                setattr(ds, key, value)
            out = io.BytesIO()
            ds.save_as(out)
            zf.writestr(f"study/{path.name}", out.getvalue())
    return buf.getvalue()


def zip_of(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


embedded_only = pytest.mark.parametrize("stack", ["embedded"], indirect=True)


@requires_sagittal
@embedded_only
def test_zip_safety(app_client, stack, monkeypatch):
    key = create_key_in_process(stack, "integrator")
    post = lambda data, **fields: app_client.post(  # noqa: E731
        "/api/v1/synthesize", headers=auth(key), files=[("dicom", ("study.zip", data, "application/zip"))],
        data=fields)
    one = sorted(SAGITTAL.glob("*.dcm"))[0].read_bytes()
    assert_problem(post(zip_of({"../../etc/evil.dcm": one})), 422, "zip_unsafe_path")
    assert_problem(post(zip_of({"/abs.dcm": one})), 422, "zip_unsafe_path")
    assert_problem(post(zip_of({"a.dcm": one}, symlink="link.dcm")), 422, "zip_unsafe_path")
    assert_problem(post(zip_of({"inner.zip": zip_of({"a.dcm": one})})), 422, "zip_nested_archive")
    assert_problem(post(zip_of({"inner.dcm": gzip.compress(one)})), 422, "zip_nested_archive")  # by content
    assert_problem(post(zip_of({"bomb.dcm": b"\0" * (20 * 1024 * 1024)})), 422, "zip_too_large")  # ratio ~1000
    assert_problem(post(b"PK\x03\x04 but not a zip"), 422, "invalid_zip")
    assert_problem(post(zip_of({"notes.txt": b"hello"})), 422, "invalid_dicom")
    from tests.service.conftest import clear_caches

    monkeypatch.setenv("MSGLDM_DICOM__MAX_FILES", "10")
    clear_caches()
    assert_problem(post(sagittal_zip()), 422, "zip_too_many_entries")
    monkeypatch.setenv("MSGLDM_DICOM__MAX_FILES", "4000")
    monkeypatch.setenv("MSGLDM_DICOM__MAX_UNCOMPRESSED_BYTES", str(1024 * 1024))  # the series is ~10 MB
    clear_caches()
    assert_problem(post(sagittal_zip()), 422, "zip_too_large")
    # the inspection runs first in the sandbox's child: a parse that outlives its limits costs the child only
    monkeypatch.setenv("MSGLDM_DICOM__MAX_UNCOMPRESSED_BYTES", str(2**31))
    monkeypatch.setenv("MSGLDM_API__PARSE_TIMEOUT_SECONDS", "0.001")
    clear_caches()
    assert_problem(post(sagittal_zip()), 422, "parse_limit_exceeded")
    monkeypatch.setenv("MSGLDM_API__PARSE_TIMEOUT_SECONDS", "60")
    clear_caches()
    assert post(sagittal_zip(), targets="flair").status_code == 202  # and the API still serves
    # nothing half-made by the refusals
    from api.core.storage import get_storage

    jobs = app_client.get("/api/v1/jobs", headers=auth(key)).json()["items"]
    assert len(jobs) == 1 and {k.split("/")[1] for k in get_storage().list_keys("jobs/")} == {jobs[0]["id"]}


@requires_sagittal
@embedded_only
def test_series_mapping_rules_and_refusals(app_client, stack):
    key = create_key_in_process(stack, "integrator")

    def post(*zips: bytes, **fields: str):
        return app_client.post("/api/v1/synthesize", headers=auth(key), data=fields,
                               files=[("dicom", (f"s{i}.zip", z, "application/zip")) for i, z in enumerate(zips)])

    # 't1_fl2d_sag' is T1 by the default rules; the job records the series and the rule
    r = post(sagittal_zip(), targets="flair", formats="nifti,dicom")
    assert r.status_code == 202, r.text
    job = app_client.get(f"/api/v1/jobs/{r.json()['id']}", headers=auth(key)).json()
    assert job["inputs"] == ["t1"] and job["formats"] == ["dicom", "nifti"]
    from api.core.db import session_scope
    from api.core.models import Job

    with session_scope() as session:
        t1 = session.get(Job, r.json()["id"]).inputs["t1"]
    assert t1["format"] == "dicom" and t1["series_description"] == "t1_fl2d_sag" and len(t1["keys"]) == 35
    assert t1["rule"].startswith("rule t1") and t1["shape"] == [256, 256, 35]

    unknown = post(sagittal_zip("localizer", 99, pydicom.uid.generate_uid(), FEW))
    body = assert_problem(unknown, 422, "series_unrecognised")
    assert "localizer" in body["detail"] and body["series"][0]["outcome"] is None
    # two series that the rules both call T1 -> ambiguous, listing both; series_map picks one
    second = sagittal_zip("t1_fl2d_sag_repeat", 4, pydicom.uid.generate_uid(), FEW)
    body = assert_problem(post(sagittal_zip(slices=FEW), second), 422, "series_ambiguous")
    assert "t1_fl2d_sag_repeat" in body["detail"] and len(body["series"]) == 2
    picked = post(sagittal_zip(slices=FEW), second, series_map="4=t1", targets="t2")
    assert picked.status_code == 202, picked.text
    with session_scope() as session:
        assert session.get(Job, picked.json()["id"]).inputs["t1"]["series_number"] == "4"
    # an unrecognised series becomes usable through series_map (by SeriesInstanceUID or as JSON)
    uid = pydicom.uid.generate_uid()
    assert post(sagittal_zip("localizer", 99, uid, FEW), series_map=f'{{"{uid}": "flair"}}').status_code == 202
    assert_problem(post(sagittal_zip(slices=FEW), series_map="3=dwi"), 422, "invalid_series_map")
    assert_problem(post(sagittal_zip(slices=FEW), series_map="77=t2"), 422, "invalid_series_map")
    assert_problem(post(sagittal_zip(slices=FEW), series_map="garbage"), 422, "invalid_series_map")
    # header refusals name the series
    body = assert_problem(post(sagittal_zip(slices=FEW, Modality="CT")), 422, "dicom_not_mr")
    assert "t1_fl2d_sag" in body["detail"]
    assert_problem(post(sagittal_zip(slices=slice(0, 1))), 422, "dicom_bad_geometry")
    other_frame = pydicom.uid.generate_uid()
    flair = sagittal_zip("t2_flair_sag", 5, pydicom.uid.generate_uid(), FEW, FrameOfReferenceUID=other_frame)
    assert_problem(post(sagittal_zip(slices=FEW), flair), 422, "frame_of_reference_mismatch")
    # the file-level parts of the upload: a loose .dcm file is accepted like a zip entry
    loose = [("dicom", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(SAGITTAL.glob("*.dcm"))[FEW]]
    r = app_client.post("/api/v1/synthesize", headers=auth(key), files=loose, data={"targets": "t2"})
    assert r.status_code == 202, r.text


@embedded_only
def test_nifti_inputs_in_another_space_are_refused_and_other_grids_accepted(app_client, stack, tmp_path):
    key = create_key_in_process(stack, "integrator")
    paths = {}
    for name, affine, shape in (("a", np.eye(4), (24, 24, 12)), ("b", np.diag([2.0, 2.0, 2.0, 1.0]), (12, 12, 6)),
                                ("far", np.array([[1.0, 0, 0, 500], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                                 (24, 24, 12))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), paths[name])
    post = lambda t1, t2: app_client.post("/api/v1/synthesize", headers=auth(key), files=[  # noqa: E731
        ("t1", ("t1.nii.gz", paths[t1].read_bytes())), ("t2", ("t2.nii.gz", paths[t2].read_bytes()))])
    assert post("a", "b").status_code == 202  # same space, other grid: the worker resamples t2 onto t1's grid
    body = assert_problem(post("a", "far"), 422, "grid_mismatch")
    assert "t2 does not overlap t1" in body["detail"]
    paths["complex"] = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.complex64), np.eye(4)), paths["complex"])
    assert_problem(post("a", "complex"), 422, "unsupported_datatype")


@pytest.mark.skipif(not NIBABEL_DATA.is_dir(), reason=f"shared sample data not found at {NIBABEL_DATA}")
def test_nibabel_edge_case_files_are_read_or_refused_with_their_code(tmp_path):
    """Every file is either accepted by the API's header check AND read by the worker's reader, or refused with a
    documented code (by the API, or by the reader as the job's error.code): nothing else escapes to the worker."""
    from api.core.errors import ProblemError
    from api.core.settings import DicomSettings
    from api.dicom import inspect_dicom_upload
    from api.uploads import inspect_nifti
    from model.io.dicom import DicomError, read_series
    from model.io.nifti import read_nifti

    documented = set(re.findall(r"`([a-z0-9_]+)`", ERRORS_DOC.read_text()))
    outcomes = {}
    for path in sorted(NIBABEL_DATA.glob("*.nii*")):
        try:
            with open(path, "rb") as f:
                header = inspect_nifti("t1", f)
                shape, affine = header.shape, header.affine
        except ProblemError as exc:
            assert exc.code in documented
            outcomes[path.name] = exc.code
            continue
        volume = read_nifti(path)  # the worker's read
        assert volume.shape == shape and np.allclose(volume.affine, affine) and np.isfinite(volume.data).all()
        outcomes[path.name] = "read"
    assert outcomes["example4d.nii.gz"] == "not_3d" and outcomes["example_nifti2.nii.gz"] in ("read", "not_3d")
    assert outcomes["anatomical.nii"] == "read" and "read" in outcomes.values()
    mosaic = [NIBABEL_DATA / "0.dcm", NIBABEL_DATA / "1.dcm"]
    with open(mosaic[0], "rb") as f0, open(mosaic[1], "rb") as f1, pytest.raises(ProblemError) as err:
        inspect_dicom_upload([("0.dcm", f0), ("1.dcm", f1)], modalities=("t1", "t2", "t1ce", "flair"),
                             series_map="12=t1", cfg=DicomSettings(), max_voxels=512**3)
    assert err.value.code == "dicom_mosaic"
    with pytest.raises(DicomError) as err:
        read_series(mosaic)
    assert err.value.code == "dicom_mosaic" and err.value.code in documented


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A micro model (32x32 slices): the end-to-end test checks geometry and DICOM, not image quality."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.msgldm import MSGLDM
    from tests.model.conftest import micro_config

    torch.manual_seed(0)
    return save_checkpoint(MSGLDM(micro_config()), tmp_path_factory.mktemp("micro") / "ck")


@pytest.fixture
def one_thread_workers(monkeypatch):
    """The worker process inherits the environment: one torch thread, like the rest of the suite (2 shared cores;
    two OpenMP threads per process under load were 25x slower here)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@requires_sagittal
@pytest.mark.parametrize("stack", ["real"], indirect=True)
def test_real_sagittal_series_round_trips_through_the_service(one_thread_workers, service, tmp_path):
    require_tools("dciodvfy", "dcm2niix")
    key = create_key(service.stack, "integrator")
    with service.client(key) as client:
        r = client.post("/api/v1/synthesize", data={"targets": "flair", "formats": "nifti,dicom", "steps": "1",
                                                    "seed": "5", "preprocess": "none"},  # the chain: test_raw_study
                        files=[("dicom", ("sag.zip", sagittal_zip(), "application/zip"))])
        assert r.status_code == 202, r.text
        job = wait_for_job(client, r.json()["id"], timeout=600)
        assert job["status"] == "succeeded", f"{job}\n{service.log_text()}"
        assert set(job["results"]) == {"flair.nii.gz", "flair.dicom.zip", "t1.input.nii.gz", "record.json",
                                      "preview.png", "report.html"}
        assert {n: (k["kind"], k["modality"]) for n, k in job["result_kinds"].items()} == {
            "flair.nii.gz": ("synthesized", "flair"), "flair.dicom.zip": ("dicom", "flair"),
            "t1.input.nii.gz": ("input", "t1"), "record.json": ("record", None), "preview.png": ("preview", None),
            "report.html": ("report", None)}
        flair = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(job["results"]["flair.nii.gz"]).content))
        t1 = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(job["results"]["t1.input.nii.gz"]).content))
        record = client.get(job["results"]["record.json"]).json()
        archive = zipfile.ZipFile(io.BytesIO(client.get(job["results"]["flair.dicom.zip"]).content))

    # the NIfTI result and the decoded input sit on the series' own grid
    assert flair.shape == t1.shape == (256, 256, 35)
    np.testing.assert_allclose(flair.affine, t1.affine, atol=1e-5)
    assert record["inputs"]["t1"]["format"] == "dicom" and record["inputs"]["t1"]["series_description"] == "t1_fl2d_sag"
    np.testing.assert_allclose(record["inputs"]["t1"]["affine"], t1.affine, atol=1e-5)

    out = tmp_path / "series"
    archive.extractall(out)
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 35
    for ds, src in on_source_slices(files, SAGITTAL.glob("*.dcm")):  # each on a source slice, same study and FoR
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert np.allclose(np.array(ds.ImageOrientationPatient, float), np.array(src.ImageOrientationPatient, float))
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds[0x0008, 0x001C].value == "YES"
    assert dciodvfy_errors(files[10]) == []
    back = nib.as_closest_canonical(dcm2niix_volume(out, tmp_path))
    ours = nib.as_closest_canonical(flair)
    np.testing.assert_allclose(back.affine, ours.affine, atol=0.05)
    expected = np.rint(np.asarray(ours.dataobj, dtype=np.float64) * 4095)
    np.testing.assert_array_equal(np.asarray(back.dataobj, dtype=np.float64), expected)
    assert expected.max() > 0



@requires_sagittal
@embedded_only
def test_worker_fails_a_series_headers_cannot_refuse_with_its_code(app_client, stack):
    """Uneven slice gaps pass the API's header checks; the worker's reader refuses them and the job fails with
    dicom_nonuniform_spacing (not a crash, not a retry), its message naming the series."""
    from worker import runtime
    from worker.tasks import run_job

    key = create_key_in_process(stack, "integrator")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, path in enumerate(sorted(SAGITTAL.glob("*.dcm"))[:4]):
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = [-81.6 + [0, 4.8, 9.6, 20.0][k], -130, 130]
            out = io.BytesIO()
            ds.save_as(out)
            zf.writestr(path.name, out.getvalue())
    r = app_client.post("/api/v1/synthesize", headers=auth(key), data={"targets": "flair"},
                        files=[("dicom", ("uneven.zip", buf.getvalue(), "application/zip"))])
    assert r.status_code == 202, r.text
    runtime._loaded.clear()  # the synthesizers this process holds
    try:
        assert run_job(r.json()["id"]) == "failed"
    finally:
        runtime._loaded.clear()  # the synthesizers this process holds
    job = app_client.get(f"/api/v1/jobs/{r.json()['id']}", headers=auth(key)).json()
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "dicom_nonuniform_spacing" and "t1_fl2d_sag" in job["error"]["message"]
