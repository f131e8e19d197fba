"""The bad-input catalogue (reliability.md section 2): every hostile or malformed upload is a 4xx problem+json
with a documented code, and nothing is half-created (no job row, no stored object). The sandbox holds its
limits; a hypothesis property test mutates valid NIfTI headers and sees only documented codes."""

from __future__ import annotations

import gzip
import io
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.core.sandbox import Rejected, SandboxError, run_limited
from tests.service.test_api import assert_problem, auth, create_key

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (16, 16, 8)


def documented_codes() -> set[str]:
    return set(re.findall(r"`([a-z0-9_]+)`", (ROOT / "docs" / "errors.md").read_text()))


def nifti(data: np.ndarray, affine: np.ndarray | None = None, *, gz: bool = True, klass=nib.Nifti1Image) -> bytes:
    img = klass(data, np.eye(4) if affine is None else affine)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def volume() -> np.ndarray:
    return np.random.default_rng(1).random(SHAPE).astype(np.float32) + 0.1


def gzip_bomb(inflated: int = 64 * 1024 * 1024) -> bytes:
    """A valid 16x16x8 float32 header and volume, followed by ``inflated`` zero bytes, in ~64 kB of gzip."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    parts = [comp.compress(nifti(volume(), gz=False))]
    zeros = bytes(1024 * 1024)
    parts += [comp.compress(zeros) for _ in range(inflated // len(zeros))]
    return b"".join(parts) + comp.flush()


def huge_header() -> bytes:
    """A header that claims 2048^3 float32 voxels (32 GiB) over a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.float32)
    return header.binaryblock + b"\0" * 4 + b"\1" * 64


def catalogue() -> dict[str, tuple[list, dict, int, str]]:
    """name -> (files, form fields, status, code)."""
    good = nifti(volume())
    nan = np.full(SHAPE, np.nan, np.float32)
    shifted = np.eye(4)
    shifted[0, 3] = 400.0  # moved out of the first one's field of view: not one physical space (another grid in
    # the same space is resampled by the worker: tests/service/test_dicom_api.py)
    raw = nifti(volume(), gz=False)
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return {
        "empty file": ([("t1", ("t1.nii.gz", b""))], {}, 422, "empty_file"),
        "random bytes": ([("t1", ("t1.nii", os.urandom(4096)))], {}, 422, "invalid_nifti"),
        "random bytes behind a gzip magic": ([("t1", ("t1.nii.gz", b"\x1f\x8b" + os.urandom(4096)))], {}, 422,
                                             "invalid_nifti"),
        "truncated gzip": ([("t1", ("t1.nii.gz", good[: len(good) // 2]))], {}, 422, "invalid_nifti"),
        "truncated uncompressed": ([("t1", ("t1.nii", raw[: len(raw) - 1000]))], {}, 422, "truncated_file"),
        "header only": ([("t1", ("t1.nii", raw[:352]))], {}, 422, "truncated_file"),
        "huge dimensions in the header": ([("t1", ("t1.nii", huge_header()))], {}, 422, "volume_too_large"),
        "gzip bomb": ([("t1", ("t1.nii.gz", gzip_bomb()))], {}, 422, "decompressed_too_large"),
        "4D": ([("t1", ("t1.nii.gz", nifti(np.ones((*SHAPE, 3), np.float32))))], {}, 422, "not_3d"),
        "2D": ([("t1", ("t1.nii.gz", nifti(np.ones((16, 16), np.float32))))], {}, 422, "not_3d"),
        "non-image (PNG)": ([("t1", ("t1.png", b"\x89PNG\r\n\x1a\n" + os.urandom(600)))], {}, 422, "invalid_nifti"),
        "non-image (RGB NIfTI)": ([("t1", ("t1.nii.gz", nifti(rgb)))], {}, 422, "unsupported_datatype"),
        "complex voxels": ([("t1", ("t1.nii.gz", nifti(np.ones(SHAPE, np.complex64))))], {}, 422,
                           "unsupported_datatype"),
        "NaN-filled": ([("t1", ("t1.nii.gz", nifti(nan)))], {}, 422, "empty_volume"),
        "all zero": ([("t1", ("t1.nii.gz", nifti(np.zeros(SHAPE, np.int16))))], {}, 422, "empty_volume"),
        "not co-registered": ([("t1", ("t1.nii.gz", good)), ("t2", ("t2.nii.gz", nifti(volume(), shifted)))], {},
                              422, "grid_mismatch"),
        "malformed header extension": ([("t1", ("t1.nii", with_broken_extension()))], {}, 422, "invalid_nifti"),
        "valid file with a header extension (accepted)": ([("t1", ("t1.nii", with_extension()))], {"targets": "t2"},
                                                          202, ""),
        "unknown modality field": ([("dwi", ("dwi.nii.gz", good))], {}, 422, "unknown_modality"),
        "unknown target": ([("t1", ("t1.nii.gz", good))], {"targets": "pet"}, 422, "unknown_target"),
        "unknown form field": ([("t1", ("t1.nii.gz", good))], {"patient_name": "x"}, 422, "unknown_field"),
        "same field twice": ([("t1", ("a.nii.gz", good)), ("t1", ("b.nii.gz", good))], {}, 422, "duplicate_field"),
    }


def test_catalogue(app_client, stack):
    """Each case: the documented status and code, quickly; afterwards no job row and no object exists."""
    key = create_key(stack, "integrator")
    codes = documented_codes()
    for name, (files, fields, status, code) in catalogue().items():
        r = app_client.post("/api/v1/synthesize", headers=auth(key), files=files, data=fields)
        assert r.status_code == status, f"{name}: {r.text}"
        if status == 202:
            accepted = r.json()["id"]
            assert app_client.post(f"/api/v1/jobs/{accepted}/cancel", headers=auth(key)).status_code == 200
            continue
        assert_problem(r, status, code)
        assert code in codes, f"{name}: {code} is not in docs/errors.md"
    # the valid file of the catalogue is accepted, so the refusals above were about the defects
    ok = app_client.post("/api/v1/synthesize", headers=auth(key), files=[("t1", ("t1.nii.gz", nifti(volume())))])
    assert ok.status_code == 202, ok.text
    from api.core.storage import get_storage

    jobs = app_client.get("/api/v1/jobs", headers=auth(key)).json()["items"]
    assert [j["id"] for j in jobs] == [ok.json()["id"], accepted]
    assert {k.split("/")[1] for k in get_storage().list_keys("jobs/")} == {ok.json()["id"], accepted}


def test_oversized_chunked_upload_is_413_while_streaming(stack, monkeypatch):
    """No Content-Length (chunked): the limit is counted in the ASGI receive path, not trusted from a header."""
    from fastapi.testclient import TestClient

    from tests.service.conftest import clear_caches, migrate_in_process

    migrate_in_process(stack, monkeypatch)
    key = create_key(stack, "integrator")
    monkeypatch.setenv("MSGLDM_API__MAX_UPLOAD_BYTES", str(256 * 1024))
    clear_caches()
    from api.main import create_app

    sent = 0

    def body():
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="t1"; filename="t1.nii"\r\n\r\n'
        for _ in range(64):  # 4 MiB offered, 256 kB allowed
            sent += 65536
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    with TestClient(create_app()) as client:
        r = client.post("/api/v1/synthesize", content=body(),
                        headers={**auth(key), "Content-Type": "multipart/form-data; boundary=b"})
        assert_problem(r, 413, "upload_too_large")
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert client.get("/api/v1/jobs", headers=auth(key)).json()["items"] == []
    clear_caches()


# --- the sandbox itself -------------------------------------------------------------------------------------

def _allocate(n: int) -> int:
    return len(bytearray(n))


def _spin() -> None:
    while True:
        pass


def _sleep() -> None:
    import time

    time.sleep(60)


def _abort() -> None:
    os.abort()


def _reject() -> None:
    raise Rejected("invalid_nifti", "no")


def _recurse(n: int = 0) -> int:
    return _recurse(n + 1)


@pytest.mark.parametrize(("fn", "args", "code"), [
    (_allocate, (2 * 1024**3,), "parse_limit_exceeded"),  # a header-driven allocation of 2 GiB
    (_spin, (), "parse_limit_exceeded"),  # CPU limit
    (_sleep, (), "parse_limit_exceeded"),  # wall-clock limit
    (_abort, (), "parse_failed"),  # a native crash
    (_recurse, (), "parse_limit_exceeded"),
])
def test_sandbox_limits(fn, args, code):
    with pytest.raises(SandboxError) as err:
        run_limited(fn, *args, memory_bytes=64 * 1024**2, cpu_seconds=1, timeout=2)
    assert err.value.code == code


def test_sandbox_passes_results_and_verdicts():
    assert run_limited(_allocate, 1024, memory_bytes=64 * 1024**2, cpu_seconds=1, timeout=10) == 1024
    with pytest.raises(Rejected) as err:
        run_limited(_reject, memory_bytes=64 * 1024**2, cpu_seconds=1, timeout=10)
    assert (err.value.status, err.value.code) == (422, "invalid_nifti")


# --- property test ------------------------------------------------------------------------------------------

def with_extension() -> bytes:
    """A NIfTI-1 with a 4 kB header extension: its voxels start well after the first 540 bytes."""
    img = nib.Nifti1Image(volume(), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 4000))
    return img.to_bytes()


def with_broken_extension() -> bytes:
    """The file above with its extension's declared size past the voxel offset: nibabel.load cannot open it."""
    data = bytearray(with_extension())
    data[352:356] = (1 << 20).to_bytes(4, "little")  # esize of the first extension
    return bytes(data)


VALID = {1: nifti(volume(), gz=False), 2: nifti(volume(), gz=False, klass=nib.Nifti2Image), 3: with_extension()}
INT_FIELDS = ["dim", "datatype", "bitpix", "vox_offset", "sizeof_hdr", "qform_code", "sform_code", "scl_slope"]


@st.composite
def mutated(draw) -> bytes:
    version = draw(st.sampled_from([1, 2, 3]))
    data = bytearray(VALID[version])
    header = (nib.Nifti2Header(bytes(data[:540])) if version == 2 else nib.Nifti1Header(bytes(data[:348])))
    how = draw(st.sampled_from(["bytes", "field", "truncate"]))
    if how == "bytes":  # overwrite a few header bytes with anything
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(header.binaryblock) - 1))] = draw(st.integers(0, 255))
    elif how == "field":  # a structured field set to an extreme or random value
        name = draw(st.sampled_from(INT_FIELDS + ["pixdim", "srow_x", "quatern_b"]))
        arr = header.structarr
        values = np.array(arr[name]).reshape(-1)
        kind = np.array(arr[name]).dtype.kind
        for i in range(values.size):
            if draw(st.booleans()):
                if kind == "f":
                    values[i] = draw(st.sampled_from([0.0, -1.0, 1e38, np.nan, np.inf, 3.5, 352.0, 1e9]))
                else:
                    info = np.iinfo(values.dtype)
                    values[i] = draw(st.sampled_from([0, -1, 1, 3, 4, 7, 32767, info.max, info.min, 2**14]))
        arr[name] = values.reshape(np.array(arr[name]).shape)
        data[: len(header.binaryblock)] = header.binaryblock
    else:
        del data[draw(st.integers(0, len(data) - 1)):]
    if draw(st.booleans()):
        return gzip.compress(bytes(data), compresslevel=1)
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=mutated())
def test_mutated_headers_give_only_documented_errors(blob: bytes):
    """inspect_nifti either accepts the file (then nibabel reads it into the declared shape) or answers 422 with
    a documented code; nothing else escapes, whatever the header says."""
    from api.core.errors import ProblemError
    from api.uploads import inspect_nifti

    try:
        head = inspect_nifti("t1", io.BytesIO(blob))
    except ProblemError as exc:
        assert exc.status == 422 and exc.code in DOCUMENTED, exc.code
        return
    raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
    klass = nib.Nifti2Image if 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")) \
        else nib.Nifti1Image
    data = np.asarray(klass.from_bytes(raw).dataobj)  # what the API accepts, the worker's reader can read
    assert data.shape[:3] == tuple(head.shape)


DOCUMENTED = documented_codes()
