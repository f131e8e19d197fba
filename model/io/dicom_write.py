"""Volume -> a classic MR Image series marked synthetic (pydicom), on the volume's own grid.

With a DICOM reference series (``reference`` = its ``meta["dicom"]``, see :func:`model.io.dicom.series_info`) the
output joins that study: patient and study attributes copied, the reference's FrameOfReferenceUID kept (the output is
on its grid, so viewers scroll both in sync). Without one (NIfTI-only input) it starts a new study with the minimal
patient module of docs/imaging.md. Series/SOP/Study/Frame-of-reference UIDs are derived from ``uid_seed`` (the job
id), so writing the same job twice gives identical UIDs. No acquisition attribute (TR, TE, flip angle, coil...) of any
input is copied: they describe another sequence.

Pixel values: the model's [0, 1] float output as ``round(value * 4095)`` unsigned 16-bit (0 outside the brain),
windowed on the 1st-99th percentiles of the brain.
"""

from __future__ import annotations

import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage

from model.io.geometry import LPS_TO_RAS, same_grid
from model.io.volume import Volume

MAX_STORED = 4095
MANUFACTURER = "MSG-LDM service"
MODEL_NAME = "MSG-LDM"
SERIES_NUMBER_BASE = 9000  # synthetic series get 9001, 9002, ... (one per target modality of the model)
NOT_FOR_DX = "NOT FOR DIAGNOSIS"


@dataclass(frozen=True)
class SyntheticSeries:
    """What the output series says about itself."""

    modality: str  # e.g. "flair"
    model_version: str
    uid_seed: str  # the job id: UIDs are derived from it
    derivation: str  # DerivationDescription: inputs, model, seed, steps
    series_index: int = 1  # SeriesNumber = SERIES_NUMBER_BASE + series_index
    # per output slice, (SOPClassUID, SOPInstanceUID) of the input images it was computed from
    sources: Sequence[Sequence[tuple[str, str]]] = field(default_factory=list)
    software_version: str = ""


def _uid(seed: str, *parts: object) -> str:
    """A UUID-derived ``2.25.`` UID (PS3.5 B.2), a pure function of its inputs."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(['msgldm', seed, *(str(p) for p in parts)])).int}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _window(data: np.ndarray) -> tuple[float, float]:
    brain = data[data > 0]
    if brain.size == 0:
        return MAX_STORED / 2, float(MAX_STORED)
    lo, hi = np.percentile(brain, [1, 99])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))


def _base_dataset(volume: Volume, series: SyntheticSeries, reference: dict[str, Any] | None, now: datetime
                  ) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = (reference or {}).get("specific_character_set") or "ISO_IR 100"
    # Patient and study: copied from the reference series, or the minimal module of a new study
    if reference:
        for key, value in {**reference.get("patient", {}), **reference.get("study", {})}.items():
            setattr(ds, key, value)
        ds.FrameOfReferenceUID = reference["frame_of_reference_uid"] or _uid(series.uid_seed, "frame-of-reference")
    else:
        ds.PatientName = "SYNTHETIC^NIFTI INPUT"
        ds.PatientID = f"MSGLDM-{series.uid_seed}"[:64]
        ds.StudyInstanceUID = _uid(series.uid_seed, "study")
        ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.StudyDescription = "MSG-LDM synthesis from NIfTI input"
        ds.FrameOfReferenceUID = _uid(series.uid_seed, "frame-of-reference")
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID",
                "AccessionNumber", "StudyDate", "StudyTime"):
        if key not in ds:
            setattr(ds, key, "")  # type 2: present, may be empty
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = (reference or {}).get("patient_position", "")  # type 2C for MR: empty when unknown
    # Series
    ds.Modality = "MR"
    ds.Laterality = ""  # type 2C (paired body parts); the brain is not one
    ds.SeriesInstanceUID = _uid(series.uid_seed, series.modality, "series")
    ds.SeriesNumber = SERIES_NUMBER_BASE + series.series_index
    ds.SeriesDescription = f"SYNTHETIC {series.modality.upper()} {MODEL_NAME} {NOT_FOR_DX}"[:64]
    ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Equipment: the synthesizer, not the scanner
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = series.model_version[:64]
    contributor = Dataset()
    contributor.PurposeOfReferenceCodeSequence = DicomSequence([_code("109100", "DCM", "Synthesizing Equipment")])
    contributor.Manufacturer = MANUFACTURER
    contributor.ManufacturerModelName = MODEL_NAME
    contributor.SoftwareVersions = [v for v in (series.model_version[:64], series.software_version[:64]) if v]
    contributor.DeviceUID = _uid(series.model_version, "device")
    contributor.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    contributor.ContributionDescription = f"synthesized {series.modality} with {series.model_version}"[:64]
    ds.ContributingEquipmentSequence = DicomSequence([contributor])
    # Image: derived, synthetic, not for primary diagnosis
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.SyntheticData = "YES"
    ds.DerivationDescription = series.derivation[:1024]
    ds.ImageComments = f"SYNTHETIC image generated by {MODEL_NAME} - {NOT_FOR_DX}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    # MR Image module: no acquisition parameters of another sequence; research-mode placeholders
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = ""
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.EchoTrainLength = ""
    ds.SliceThickness = ""
    # Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_dicom_series(volume: Volume, out_dir: str | Path, series: SyntheticSeries,
                       reference: dict[str, Any] | None = None) -> list[Path]:
    """Write ``volume`` (float in [0, 1]) as one file per slice of its third axis; returns the paths in order.

    With ``reference`` the volume must be on the reference series' grid (the worker restores results onto it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if reference and not same_grid(volume.shape, volume.affine, reference["shape"], np.array(reference["affine"]),
                                   atol=1e-3):
        raise ValueError(f"the {series.modality} volume is not on the grid of reference series "
                         f"{reference['series_instance_uid']}: cannot write it into that frame of reference")
    now = datetime.now(UTC)
    base = _base_dataset(volume, series, reference, now)
    stored = np.clip(np.rint(np.nan_to_num(np.asarray(volume.data, np.float64)) * MAX_STORED), 0, MAX_STORED
                     ).astype(np.uint16)
    centre, width = _window(stored)
    base.WindowCenter, base.WindowWidth = f"{centre:.1f}", f"{width:.1f}"
    affine_lps = LPS_TO_RAS @ volume.affine
    col_step, row_step, slice_step = affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2]
    row_cos, col_cos = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    base.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
    base.PixelSpacing = [f"{np.linalg.norm(row_step):.6f}", f"{np.linalg.norm(col_step):.6f}"]
    base.SpacingBetweenSlices = f"{np.linalg.norm(slice_step):.6f}"
    base.Rows, base.Columns = volume.shape[1], volume.shape[0]
    normal = np.cross(row_cos, col_cos)
    if abs(row_cos @ col_cos) > 1e-4 or abs(abs(slice_step @ normal) / np.linalg.norm(slice_step) - 1) > 1e-4:
        raise ValueError(f"the {series.modality} volume's affine is sheared: a DICOM image plane cannot hold it")
    paths = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = _uid(series.uid_seed, series.modality, "instance", k)
        ds.InstanceNumber = k + 1
        position = affine_lps[:3, :3] @ np.array([0.0, 0.0, k]) + affine_lps[:3, 3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceLocation = f"{float(position @ normal):.6f}"
        sources = series.sources[k] if k < len(series.sources) else []
        if sources:
            items = []
            for sop_class, sop_uid in sources:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
                item.PurposeOfReferenceCodeSequence = DicomSequence(
                    [_code("121322", "DCM", "Source image for image processing operation")])
                items.append(item)
            ds.SourceImageSequence = DicomSequence(items)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_series(paths: Sequence[Path], zip_path: str | Path, folder: str) -> Path:
    """The series files in a zip, under ``folder/``."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for p in paths:
            zf.write(p, f"{folder}/{p.name}")
    return Path(zip_path)
