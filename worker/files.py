"""The worker's image I/O: a job's stored inputs -> Volumes, and a synthesis result -> result files.

NIfTI inputs are read with ``model.io.nifti``; a DICOM input is one series (its files under
``jobs/{id}/inputs/{modality}/``) read with ``model.io.dicom.read_series``. Results: ``{modality}.nii.gz`` (float32 on
the reference input's grid, always), ``{modality}.uncertainty.nii.gz`` (samples > 1), ``{modality}.input.nii.gz`` for
each DICOM input (the decoded volume, for viewers), and with ``formats`` dicom ``{modality}.dicom.zip``: a synthetic MR
series in the reference series' study and frame of reference (a new study when the reference input is NIfTI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from api.core import results as result_names
from api.core.models import Job
from api.core.storage import get_storage
from worker.native import JobResult


def read_inputs(job: Job, workdir: Path) -> dict[str, Any]:
    """``{modality: Volume}`` in the job's input order (the first is the reference)."""
    from model.io.dicom import read_series
    from model.io.nifti import read_nifti

    storage = get_storage()
    study = {}
    for modality, info in job.inputs.items():
        if info.get("format") == "dicom":
            folder = workdir / "inputs" / modality
            paths = [storage.get_file(key, folder / Path(key).name) for key in info["keys"]]
            study[modality] = read_series(paths)
        else:
            local = storage.get_file(info["key"], workdir / Path(info["key"]).name)
            study[modality] = read_nifti(local)
    return study


def input_record(job: Job, study: dict[str, Any]) -> dict[str, Any]:
    """What record.json says about each input."""
    out = {}
    for m, info in job.inputs.items():
        entry = {"format": info.get("format", "nifti"), "sha256": info["sha256"], "bytes": info["bytes"],
                 "shape": info["shape"], "nonfinite_voxels_set_to_0": study[m].meta.get("nonfinite_voxels", 0),
                 "reference": m in job.targets}  # validation mode: withheld from the model, scored against
        if info.get("format") == "dicom":
            entry |= {k: info.get(k) for k in ("series_instance_uid", "series_number", "series_description",
                                               "frame_of_reference_uid", "study_instance_uid", "rule")}
            entry["affine"] = study[m].affine.round(6).tolist()
        out[m] = entry
    return out


def _sources(study: dict[str, Any], reference_affine: np.ndarray, shape: tuple[int, int, int]
             ) -> list[list[tuple[str, str]]]:
    """Per output slice, the nearest slice of every DICOM input (SourceImageSequence)."""
    out: list[list[tuple[str, str]]] = [[] for _ in range(shape[2])]
    centre = [(shape[0] - 1) / 2, (shape[1] - 1) / 2]
    for volume in study.values():
        dicom = volume.meta.get("dicom")
        if not dicom:
            continue
        to_input = np.linalg.inv(volume.affine) @ reference_affine
        for k in range(shape[2]):
            slice_index = int(round(float((to_input @ np.array([*centre, k, 1.0]))[2])))
            if 0 <= slice_index < len(dicom["sop_instance_uids"]):
                out[k].append((dicom["sop_class_uid"], dicom["sop_instance_uids"][slice_index]))
    return out


def write_result_files(job: Job, result: JobResult, study: dict[str, Any], workdir: Path, software_version: str = ""
                       ) -> dict[str, Path]:
    """Result name -> local file, written under ``workdir/out``."""
    from model.io.dicom_write import SyntheticSeries, write_dicom_series, zip_series
    from model.io.nifti import write_nifti

    out_dir = workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for m, volume in result.volumes.items():
        name = result_names.name("synthesized", m)
        files[name] = write_nifti(volume, out_dir / name)
    for m, volume in (result.uncertainty or {}).items():
        name = result_names.name("uncertainty", m)
        files[name] = write_nifti(volume, out_dir / name)
    for name, volume in result.overlays.items():  # a raw study's checks, drawn over the viewer's panels
        files[result_names.overlay(name)] = write_nifti(volume, out_dir / result_names.overlay(name))
    for m, volume in study.items():
        if volume.meta.get("dicom"):
            name = result_names.name("input", m)
            files[name] = write_nifti(volume, out_dir / name)
    if "dicom" in (job.formats or []):
        reference = result.meta.get("reference") or next(iter(study))
        ref_dicom = None if result.meta.get("output_grid") == "atlas" else study[reference].meta.get("dicom")
        meta = result.meta
        for index, (m, volume) in enumerate(result.volumes.items(), start=1):
            series = SyntheticSeries(
                modality=m, model_version=meta.get("version", ""), uid_seed=job.id, series_index=index,
                derivation=(f"Synthesized {m.upper()} from {', '.join(x.upper() for x in study)} by MSG-LDM "
                            f"{meta.get('version', '')}, seed {meta.get('seed')}, {meta.get('steps')} steps, "
                            f"{meta.get('samples', 1)} sample(s); reference grid {reference.upper()}"),
                sources=_sources(study, volume.affine, volume.shape), software_version=software_version)
            paths = write_dicom_series(volume, workdir / f"dicom-{m}", series, ref_dicom)
            name = result_names.name("dicom", m)
            files[name] = zip_series(paths, out_dir / name, f"synthetic-{m}")
    return files
