"""The names of a job's result files, in one place: the worker names what it writes with these functions, and the
API reports each result's kind (``GET /jobs/{id}`` -> ``result_kinds``) with :func:`kind_of`, so that no client
has to read meaning into file names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["synthesized", "uncertainty", "reference", "input", "dicom", "overlay", "preview", "report", "record"]
PREVIEW, REPORT, RECORD = "preview.png", "report.html", "record.json"
OVERLAYS = ("brain_mask.outline", "registration.edges")  # a raw study's checks (worker/native.py), not per modality


def synthesized(modality: str) -> str:
    return f"{modality}.nii.gz"


def uncertainty(modality: str) -> str:
    return f"{modality}.uncertainty.nii.gz"


def reference(modality: str) -> str:
    return f"{modality}.reference.nii.gz"


def decoded_input(modality: str) -> str:
    return f"{modality}.input.nii.gz"


def dicom(modality: str) -> str:
    return f"{modality}.dicom.zip"


def overlay(name: str) -> str:
    return f"{name}.nii.gz"


@dataclass(frozen=True)
class ResultKind:
    kind: Kind
    modality: str | None = None  # the modality it belongs to; None for the job's own files and the overlays
    overlay: str | None = None  # for kind "overlay": which one (OVERLAYS)


_SUFFIXES: tuple[tuple[str, Kind], ...] = ((".uncertainty.nii.gz", "uncertainty"), (".reference.nii.gz", "reference"),
                                           (".input.nii.gz", "input"), (".dicom.zip", "dicom"),
                                           (".nii.gz", "synthesized"))


def kind_of(name: str) -> ResultKind:
    """What the result ``name`` (made by the functions above) is."""
    fixed: dict[str, Kind] = {PREVIEW: "preview", REPORT: "report", RECORD: "record"}
    if name in fixed:
        return ResultKind(fixed[name])
    for o in OVERLAYS:
        if name == overlay(o):
            return ResultKind("overlay", overlay=o)
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return ResultKind(kind, modality=name[: -len(suffix)])
    raise ValueError(f"{name!r} is not a result name of this service")
