"""DICOM MR series -> Volume (pydicom; compressed transfer syntaxes through the pylibjpeg plugins).

A series is the set of files sharing a SeriesInstanceUID. Its slices are sorted along the slice normal
(``cross(row_cos, col_cos)``) by ImagePositionPatient, never by InstanceNumber or SliceLocation; the slice step is
measured from the positions, never taken from SliceThickness/SpacingBetweenSlices. Rescale slope/intercept are
applied. The affine is the LPS one of PS3.3 C.7.6.2.1.1 converted to RAS+ (NIfTI), so the Volume's voxel ``(i, j, k)``
is column ``i``, row ``j`` of slice ``k``.

What the model cannot use is refused with a :class:`DicomError` whose ``code`` is stable (docs/errors.md) and whose
message names the series: non-MR, Siemens mosaic, multi-frame/4D, inconsistent or missing geometry, non-uniform
slice spacing, gantry tilt, missing or undecodable pixel data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from model.io.geometry import LPS_TO_RAS
from model.io.volume import Volume

SPACING_RTOL = 0.01  # slice gaps may differ by 1% (float positions written by scanners)
TILT_TOL_DEG = 0.5  # angle between the slice step and the slice normal
PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                  "AccessionNumber", "StudyDescription")


class DicomError(ValueError):
    """A DICOM input the service cannot use; ``code`` is the stable error code."""

    code = "invalid_dicom"


class NotDicomError(DicomError):
    code = "invalid_dicom"


class NotMRError(DicomError):
    code = "dicom_not_mr"


class MosaicError(DicomError):
    code = "dicom_mosaic"


class MultiVolumeError(DicomError):
    code = "dicom_4d"


class SeriesGeometryError(DicomError):
    code = "dicom_bad_geometry"


class NonUniformSpacingError(DicomError):
    code = "dicom_nonuniform_spacing"


class GantryTiltError(DicomError):
    code = "dicom_gantry_tilt"


class MissingPixelDataError(DicomError):
    code = "dicom_no_pixel_data"


class PixelDecodeError(DicomError):
    code = "dicom_undecodable"


def describe(ds: Dataset) -> str:
    """How messages name a series: number, description and UID."""
    return (f"series {ds.get('SeriesNumber', '?')} {str(ds.get('SeriesDescription', '')).strip()!r} "
            f"({ds.get('SeriesInstanceUID', 'no SeriesInstanceUID')})")


def read_header(src: str | Path | IO[bytes], name: str | None = None) -> Dataset:
    """Parse one file up to (not including) its pixel data. ``ds.has_pixel_data`` (an attribute this sets) says
    whether pixel data follow. Anything pydicom cannot parse raises :class:`NotDicomError`."""
    label = name or (str(src) if isinstance(src, str | Path) else str(getattr(src, "name", "a file")))
    fp = open(src, "rb") if isinstance(src, str | Path) else src  # noqa: SIM115 - closed below when opened here
    try:
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        for _ in ds.iterall():  # pydicom converts values lazily: surface bad values here, not later
            pass
        tag = fp.read(4)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a malformed file
        raise NotDicomError(f"{label}: not a readable DICOM file ({type(exc).__name__}: {exc})"[:500]) from exc
    finally:
        if isinstance(src, str | Path):
            fp.close()
        else:
            fp.seek(0)
    ds.has_pixel_data = tag[:2] in (b"\xe0\x7f", b"\x7f\xe0")  # group 7FE0 in either byte order
    ds.source_name = label
    return ds


def group_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    """Datasets by SeriesInstanceUID, in first-seen order."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            raise SeriesGeometryError(f"{getattr(ds, 'source_name', 'a file')}: no SeriesInstanceUID")
        groups.setdefault(uid, []).append(ds)
    return groups


@dataclass(frozen=True)
class SeriesGeometry:
    datasets: list[Dataset]  # sorted along the slice normal
    affine: np.ndarray  # RAS+ voxel (column, row, slice) -> mm
    shape: tuple[int, int, int]  # (columns, rows, slices)


def _floats(ds: Dataset, keyword: str, n: int, what: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in ds.get(keyword)], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesGeometryError(f"{describe(ds)}: {keyword} missing or not numeric ({what})") from exc
    if values.shape != (n,) or not np.all(np.isfinite(values)):
        raise SeriesGeometryError(f"{describe(ds)}: {keyword} must be {n} finite numbers ({what})")
    return values


def check_headers(datasets: Sequence[Dataset]) -> None:
    """What one series' headers alone rule out (not MR, mosaic, multi-frame, one slice, no pixel data), naming the
    series; the API refuses an upload with these before any pixel is read."""
    first = datasets[0]
    name = describe(first)
    if str(first.get("Modality", "")).upper() != "MR":
        raise NotMRError(f"{name}: Modality is {first.get('Modality', 'missing')!r}, only MR series are used")
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if "MOSAIC" in image_type or (0x0019, 0x100A) in first:
        raise MosaicError(f"{name}: a Siemens mosaic (several slices tiled in one image) is not supported")
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1 or len(datasets) < 2 and "PerFrameFunctionalGroupsSequence" in first:
        raise MultiVolumeError(f"{name}: multi-frame images ({frames} frames) are not supported; send classic "
                               f"single-frame MR images")
    if len(datasets) < 2:
        raise SeriesGeometryError(f"{name}: {len(datasets)} slice; a volume needs at least 2")
    missing = [getattr(ds, "source_name", "?") for ds in datasets if not getattr(ds, "has_pixel_data", True)]
    if missing:
        raise MissingPixelDataError(f"{name}: {len(missing)} file(s) without pixel data (e.g. {missing[0]})")


def check_series(datasets: Sequence[Dataset]) -> SeriesGeometry:
    """:func:`check_headers` and the series' geometry (what the model cannot use raises, naming the series)."""
    check_headers(datasets)
    first = datasets[0]
    name = describe(first)
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    iop = _floats(first, "ImageOrientationPatient", 6, "slice orientation")
    spacing = _floats(first, "PixelSpacing", 2, "pixel size")
    if rows < 1 or cols < 1 or np.any(spacing <= 0):
        raise SeriesGeometryError(f"{name}: Rows {rows}, Columns {cols}, PixelSpacing {spacing.tolist()} are invalid")
    row_cos, col_cos = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_cos) - 1) > 1e-2 or abs(np.linalg.norm(col_cos) - 1) > 1e-2 \
            or abs(row_cos @ col_cos) > 1e-2:
        raise SeriesGeometryError(f"{name}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    for ds in datasets[1:]:
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (rows, cols) \
                or not np.allclose(_floats(ds, "ImageOrientationPatient", 6, "slice orientation"), iop, atol=1e-4) \
                or not np.allclose(_floats(ds, "PixelSpacing", 2, "pixel size"), spacing, atol=1e-4):
            raise SeriesGeometryError(f"{name}: slices differ in size, orientation or pixel spacing "
                                      f"({getattr(ds, 'source_name', '?')})")
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, "slice position") for ds in datasets])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance, positions = distance[order], positions[order]
    gaps = np.diff(distance)
    if np.any(gaps < 1e-3):
        raise MultiVolumeError(f"{name}: several images at one slice position (4D: echoes, time points or repeats); "
                               f"send a 3D series")
    if np.ptp(gaps) > SPACING_RTOL * gaps.mean():
        raise NonUniformSpacingError(f"{name}: slice gaps vary from {gaps.min():.3f} to {gaps.max():.3f} mm")
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    tilt = float(np.degrees(np.arccos(np.clip(abs(step @ normal) / np.linalg.norm(step), -1, 1))))
    if tilt > TILT_TOL_DEG or abs(float(first.get("GantryDetectorTilt", 0) or 0)) > TILT_TOL_DEG:
        raise GantryTiltError(f"{name}: slices are stacked {tilt:.2f} degrees off their normal (gantry tilt)")
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * spacing[1]  # along a row: column index i
    affine_lps[:3, 1] = col_cos * spacing[0]  # down a column: row index j
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    return SeriesGeometry([datasets[i] for i in order], LPS_TO_RAS @ affine_lps, (cols, rows, len(datasets)))


def _pixels(ds: Dataset, name: str) -> np.ndarray:
    if "PixelData" not in ds:
        raise MissingPixelDataError(f"{name}: {getattr(ds, 'source_name', '?')} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise PixelDecodeError(f"{name}: colour images ({ds.get('SamplesPerPixel')} samples per pixel) are not MR")
    try:
        from pydicom.pixels import apply_rescale

        arr = apply_rescale(ds.pixel_array, ds)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types (missing plugin, corrupt stream)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise PixelDecodeError(f"{name}: pixel data of {getattr(ds, 'source_name', '?')} cannot be decoded "
                               f"(transfer syntax {syntax}: {type(exc).__name__}: {exc})"[:600]) from exc
    if arr.shape != (ds.Rows, ds.Columns):
        raise PixelDecodeError(f"{name}: decoded pixel array has shape {arr.shape}, the header says "
                               f"{ds.Rows}x{ds.Columns}")
    return arr


def _jsonable(value: Any) -> Any:
    if isinstance(value, pydicom.valuerep.PersonName):
        return str(value)
    if isinstance(value, pydicom.multival.MultiValue):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, int | float) else str(value)


def series_info(geometry: SeriesGeometry) -> dict[str, Any]:
    """JSON-serialisable facts about a checked series: what the job record keeps and the writer copies."""
    first = geometry.datasets[0]
    return {
        "series_instance_uid": str(first.SeriesInstanceUID),
        "series_number": _jsonable(first.get("SeriesNumber", "")),
        "series_description": str(first.get("SeriesDescription", "")),
        "protocol_name": str(first.get("ProtocolName", "")),
        "sequence_name": str(first.get("SequenceName", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "sop_instance_uids": [str(ds.get("SOPInstanceUID", "")) for ds in geometry.datasets],
        "shape": list(geometry.shape),
        "affine": geometry.affine.round(6).tolist(),
        "patient": {k: _jsonable(first.get(k)) for k in PATIENT_KEYWORDS if first.get(k) is not None},
        "study": {k: _jsonable(first.get(k)) for k in STUDY_KEYWORDS if first.get(k) is not None},
        "patient_position": str(first.get("PatientPosition", "")),
        "specific_character_set": _jsonable(first.get("SpecificCharacterSet", "")),
    }


def read_series(paths: Sequence[str | Path]) -> Volume:
    """The files of ONE series -> float32 Volume (rescale applied) with ``meta["dicom"]`` = :func:`series_info`."""
    datasets = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
            for _ in ds.iterall():  # values are converted lazily: surface bad ones here
                pass
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a malformed file
            raise NotDicomError(f"{p}: not a readable DICOM file ({type(exc).__name__}: {exc})"[:500]) from exc
        ds.source_name = str(p)
        ds.has_pixel_data = "PixelData" in ds
        datasets.append(ds)
    if not datasets:
        raise DicomError("no DICOM file given")
    groups = group_series(datasets)
    if len(groups) > 1:
        raise DicomError(f"{len(groups)} series given where one was expected: "
                         + "; ".join(describe(g[0]) for g in groups.values()))
    try:
        geometry = check_series(datasets)
        name = describe(geometry.datasets[0])
        data = np.stack([_pixels(ds, name).T for ds in geometry.datasets], axis=2).astype(np.float32)
        info = series_info(geometry)
    except DicomError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        raise SeriesGeometryError(f"{describe(datasets[0])}: a header value has the wrong type or form "
                                  f"({type(exc).__name__}: {exc})"[:500]) from exc
    return Volume(data=data, affine=geometry.affine, meta={
        "source": name, "frame_of_reference_uid": info["frame_of_reference_uid"], "dicom": info,
        "nonfinite_voxels": 0,
    })


def read_dicom(paths: Sequence[str | Path]) -> dict[str, Volume]:
    """Files of any number of series -> ``{SeriesInstanceUID: Volume}`` (a notebook helper; the service maps series
    to modalities in the API and reads each series with :func:`read_series`)."""
    groups = group_series(read_header(p) for p in paths)
    return {uid: read_series([ds.source_name for ds in group]) for uid, group in groups.items()}
