"""The names of a job's result files, in one place: the worker names what it writes with these functions, and the
API reports each result's kind (``GET /jobs/{id}`` -> ``result_kinds``) with :func:`kind_of`, so that no client
has to read meaning into file names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["synthesized", "uncertainty", "reference", "input", "dicom", "overlay", "preview", "report", "record"]
PREVIEW, REPORT, RECORD = "preview.png", "report.html", "record.json"
_OWN: dict[str, Kind] = {PREVIEW: "preview", REPORT: "report", RECORD: "record"}  # the job's own files
OVERLAYS = ("brain_mask.outline", "registration.edges")  # a raw study's checks (worker/native.py), not per modality


# per-modality results: kind -> suffix after the modality's name (longest first, as kind_of matches them)
SUFFIXES: dict[Kind, str] = {"uncertainty": ".uncertainty.nii.gz", "reference": ".reference.nii.gz",
                             "input": ".input.nii.gz", "dicom": ".dicom.zip", "synthesized": ".nii.gz"}


def name(kind: Kind, modality: str) -> str:
    """A per-modality result's name: ``flair.nii.gz``, ``flair.uncertainty.nii.gz``, ``t1.input.nii.gz``, ..."""
    return modality + SUFFIXES[kind]


def overlay(name: str) -> str:
    return f"{name}.nii.gz"


@dataclass(frozen=True)
class ResultKind:
    kind: Kind
    modality: str | None = None  # the modality it belongs to; None for the job's own files and the overlays
    overlay: str | None = None  # for kind "overlay": which one (OVERLAYS)


def kind_of(name: str) -> ResultKind:
    """What the result ``name`` (made by the functions above) is."""
    if name in _OWN:
        return ResultKind(_OWN[name])
    for o in OVERLAYS:
        if name == overlay(o):
            return ResultKind("overlay", overlay=o)
    for kind, suffix in SUFFIXES.items():
        if name.endswith(suffix):
            return ResultKind(kind, modality=name[: -len(suffix)])
    raise ValueError(f"{name!r} is not a result name of this service")
