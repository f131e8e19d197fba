"""Datasets on disk -> cases: find, split, load and check brain-MRI studies in the documented layouts.

A *case* is one subject (one time point) with a file per modality in the model vocabulary
(``t1``, ``t2``, ``t1ce``, ``flair``, ``pd``) and an optional segmentation. Layouts (see the data README):

==================  ==========================================================================================
``brats2020``       ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 1,2,4
``brats2021``       ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 1,2,4
``brats2023``       ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``, labels 1,2,3
``brats-toolkit``   ``TCGA-DU-7294_{t1,t1c,t2,fla}.nii.gz`` + ``fusion_simple_predicted_seg.nii.gz`` (a model
                    prediction, *not* expert truth: ``Case.seg_is_prediction``), labels 1,2,4
``wmh``             ``<site>/<id>/pre/{FLAIR,T1}.nii.gz`` + ``<site>/<id>/wmh.nii.gz``, label 1 WMH, 2 ignored
``ixi``             ``IXI002-Guys-0828-{T1,T2,PD}.nii.gz``, any file-name prefix (``hd_bet_``), flat or per folder
==================  ==========================================================================================

Nothing here imports torch: the training and evaluation code turn volumes into tensors themselves.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.io.nifti import read_nifti
from model.io.volume import Volume

LAYOUTS = ("brats2020", "brats2021", "brats2023", "brats-toolkit", "wmh", "ixi")
MODALITIES = ("t1", "t2", "t1ce", "flair", "pd")
REGIONS = ("background", "WT", "TC", "ET")

# Labels of each tumour region per layout (WT = whole tumour, TC = tumour core, ET = enhancing tumour).
LABEL_CONVENTIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brats2020": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    "brats-toolkit": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "wmh": {"WT": (1,), "TC": (), "ET": ()},
}
IGNORED_LABELS: dict[str, tuple[int, ...]] = {"wmh": (2,)}

_NII = r"\.nii(?:\.gz)?$"
_BRATS2023 = re.compile(r"^(?P<id>.+)-(?P<mod>t1n|t1c|t2w|t2f|seg)" + _NII)
_BRATS2023_MODS = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
_BRATS_OLD = re.compile(r"^(?P<id>.+)_(?P<mod>t1|t1ce|t2|flair|seg)" + _NII)
_TOOLKIT = re.compile(r"^(?P<id>.+)_(?P<mod>t1|t1c|t2|fla)" + _NII)
_TOOLKIT_MODS = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "fla": "flair"}
_TOOLKIT_SEG = re.compile(r"^(?:fusion_\w*seg|seg|segmentation)" + _NII)  # the toolkit's output names
_IXI = re.compile(r"^(?P<prefix>.*?)(?P<id>IXI\d{3}-[A-Za-z]+-\d{4})-(?P<mod>T1|T2|PD)" + _NII)
_WMH_MODS = {"FLAIR": "flair", "T1": "t1"}


class DatasetError(ValueError):
    """A dataset folder that cannot be read as cases: missing files, unknown layout, bad arguments."""


@dataclass(frozen=True)
class Case:
    """One subject (one time point): a file per available modality (model vocabulary) and an optional seg.

    ``seg_is_prediction`` marks a segmentation that is a model's output, not expert truth (BraTS-Toolkit
    fusion); reports must label metrics computed against it accordingly.
    """

    id: str
    images: dict[str, Path]
    seg: Path | None
    layout: str
    seg_is_prediction: bool = False
    subject: str = ""  # the person; several cases (time points) may share one. Defaults to ``id``.
    folder: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.images) - set(MODALITIES))
        if unknown:
            raise DatasetError(f"case {self.id}: unknown modalities {unknown}, expected {', '.join(MODALITIES)}")
        object.__setattr__(self, "images", {m: Path(self.images[m]) for m in MODALITIES if m in self.images})
        if not self.subject:
            object.__setattr__(self, "subject", self.id)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Available modalities in the model's canonical order."""
        return tuple(m for m in MODALITIES if m in self.images)


# ----------------------------------------------------------------------------------------------- discovery


def find_cases(
    root: str | Path | Sequence[str | Path],
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
) -> list[Case]:
    """Find every case under ``root``: one case folder, a folder of case folders (any depth), or a list of them.

    ``layout="auto"`` recognises each case from its file names; naming a layout keeps only cases in it and
    fails when there are none. ``modalities`` lists the modalities every case must have (e.g. a preset's);
    a case lacking one raises :class:`DatasetError` naming it. Cases come back sorted by id.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}: expected 'auto' or one of {', '.join(LAYOUTS)}")
    if modalities is not None:
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise DatasetError(f"unknown modalities {unknown}: the model vocabulary is {', '.join(MODALITIES)}")
    roots = [Path(root)] if isinstance(root, str | os.PathLike) else [Path(r) for r in root]
    if not roots:
        raise DatasetError("no dataset folder given")
    cases: dict[str, Case] = {}
    ixi_files: dict[str, dict[str, Path]] = defaultdict(dict)
    for folder in roots:
        if not folder.exists():
            raise DatasetError(f"dataset folder {folder} does not exist")
        if not folder.is_dir():
            raise DatasetError(f"{folder} is not a folder: give a case folder or a folder of case folders")
        for case in _scan(folder, ixi_files):
            _add(cases, case)
    for subject, images in ixi_files.items():
        _add(cases, Case(id=subject, images=dict(images), seg=None, layout="ixi",
                         folder=next(iter(images.values())).parent))
    found = sorted(cases.values(), key=lambda c: c.id)
    if layout != "auto":
        found = [c for c in found if c.layout == layout]
    if not found:
        where = ", ".join(str(r) for r in roots)
        wanted = f"layout {layout!r}" if layout != "auto" else f"any of the layouts {', '.join(LAYOUTS)}"
        raise DatasetError(f"no cases in {wanted} found under {where}")
    if modalities is not None:
        missing = [(c, [m for m in modalities if m not in c.images]) for c in found]
        missing = [(c, m) for c, m in missing if m]
        if missing:
            lines = "; ".join(f"{c.id} ({c.folder}) lacks {', '.join(m)}" for c, m in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(f"{len(missing)} case(s) miss required modalities: {lines}{more}")
    return found


def _add(cases: dict[str, Case], case: Case) -> None:
    if case.id in cases and cases[case.id] != case:
        raise DatasetError(f"case id {case.id!r} found twice: in {cases[case.id].folder} and in {case.folder}")
    cases[case.id] = case


def _scan(root: Path, ixi_files: dict[str, dict[str, Path]]) -> list[Case]:
    """Walk ``root``; return the non-IXI cases and collect IXI files by subject (IXI ships one folder per
    modality, so its cases are assembled across folders)."""
    cases: list[Case] = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames.sort()
        if "pre" in dirnames and _is_wmh_case(folder):
            cases.append(_wmh_case(folder))
            dirnames[:] = []  # the case's own subfolders hold nothing else
            continue
        names = sorted(f for f in filenames if re.search(_NII, f))
        if names:
            cases.extend(_cases_in_folder(folder, names, ixi_files))
    return cases


def _is_wmh_case(folder: Path) -> bool:
    return any((folder / "pre" / f"{m}{ext}").is_file() for m in _WMH_MODS for ext in (".nii.gz", ".nii"))


def _wmh_case(folder: Path) -> Case:
    images = {}
    for name, mod in _WMH_MODS.items():
        for ext in (".nii.gz", ".nii"):
            if (folder / "pre" / f"{name}{ext}").is_file():
                images[mod] = folder / "pre" / f"{name}{ext}"
                break
    seg = next((folder / f"wmh{ext}" for ext in (".nii.gz", ".nii") if (folder / f"wmh{ext}").is_file()), None)
    return Case(id=f"{folder.parent.name}_{folder.name}", images=images, seg=seg, layout="wmh", folder=folder)


def _cases_in_folder(folder: Path, names: list[str], ixi_files: dict[str, dict[str, Path]]) -> list[Case]:
    """Group the NIfTI files of one folder into cases by the id in their names."""
    groups: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)  # (family, id) -> raw suffix -> path
    loose_segs: list[Path] = []
    for name in names:
        path = folder / name
        if m := _IXI.match(name):
            ixi_files[m["id"]].setdefault(m["mod"].lower(), path)
        elif _TOOLKIT_SEG.match(name):
            loose_segs.append(path)
        elif m := _BRATS2023.match(name):
            groups[("brats2023", m["id"])][m["mod"]] = path
        elif (m := _BRATS_OLD.match(name)) or (m := _TOOLKIT.match(name)):
            groups[("brats-old", m["id"])][m["mod"]] = path
    cases = []
    for (family, case_id), files in sorted(groups.items()):
        if family == "brats2023":
            images = {_BRATS2023_MODS[k]: p for k, p in files.items() if k != "seg"}
            # BraTS 2023+ ids end in a time point (-000, -001): the subject is the id without it.
            subject = re.sub(r"-\d{3}$", "", case_id)
            cases.append(Case(case_id, images, files.get("seg"), "brats2023", subject=subject, folder=folder))
            continue
        toolkit = bool({"t1c", "fla"} & files.keys())
        if toolkit and {"t1ce", "flair"} & files.keys():
            raise DatasetError(f"case {case_id} in {folder} mixes BraTS (t1ce/flair) and BraTS-Toolkit (t1c/fla) names")
        if toolkit:
            images = {_TOOLKIT_MODS[k]: p for k, p in files.items()}
            seg = files.get("seg") or (loose_segs[0] if len(loose_segs) == 1 else None)
            # The toolkit's segmentation is a fusion of segmentation models' outputs, never expert truth.
            cases.append(Case(case_id, images, seg, "brats-toolkit", seg_is_prediction=seg is not None, folder=folder))
        else:
            images = {k: p for k, p in files.items() if k != "seg"}
            layout = "brats2021" if case_id.startswith("BraTS2021") else "brats2020"
            cases.append(Case(case_id, images, files.get("seg"), layout, folder=folder))
    return [c for c in cases if c.images]


# ----------------------------------------------------------------------------------------------- splits


def split_cases(
    cases: Sequence[Case],
    *,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    test_cases: Sequence[str] = (),
) -> dict[str, list[Case]]:
    """Subject-level split into ``train``/``val``/``test``: all time points of a subject go to one split.

    Deterministic for a given seed and set of cases (the order the cases come in does not matter). A
    non-zero fraction gets at least one subject while leaving at least one for training. The subjects of
    ``test_cases`` (case ids; those not among ``cases`` are ignored) are always in the test split, counted in its
    fraction; the rest of it is drawn at random.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DatasetError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) "
                           "and sum to less than 1")
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise DatasetError(f"duplicate case ids cannot be split: {dup}")
    forced = sorted({c.subject for c in cases if c.id in set(test_cases)})
    subjects = sorted({c.subject for c in cases})
    order = np.random.default_rng(seed).permutation(len(subjects))
    n = len(subjects)
    # forced test subjects first, then the others in the seeded order
    order = [subjects.index(s) for s in forced] + [int(i) for i in order if subjects[i] not in forced]

    def count(fraction: float) -> int:
        return 0 if fraction == 0 or n < 2 else max(1, round(n * fraction))

    n_test = max(count(test_fraction), len(forced))
    n_val = min(count(val_fraction), max(n - 1 - n_test, 0))
    n_test = min(n_test, max(n - 1, 0))
    test = {subjects[i] for i in order[:n_test]}
    val = {subjects[i] for i in order[n_test:n_test + n_val]}
    splits: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    for c in sorted(cases, key=lambda c: c.id):
        splits["test" if c.subject in test else "val" if c.subject in val else "train"].append(c)
    return splits


# ----------------------------------------------------------------------------------------------- loading


def load_case(case: Case) -> tuple[dict[str, Volume], Volume | None]:
    """Read a case's images (model vocabulary -> Volume, stored voxel order) and its segmentation if any."""
    images = {}
    for mod in case.modalities:
        path = case.images[mod]
        if not path.is_file():
            raise DatasetError(f"case {case.id}: {mod} file {path} does not exist")
        images[mod] = read_nifti(path)
    seg = None
    if case.seg is not None:
        if not case.seg.is_file():
            raise DatasetError(f"case {case.id}: segmentation file {case.seg} does not exist")
        seg = read_nifti(case.seg)
    return images, seg


def seg_to_regions(seg: np.ndarray, layout: str) -> np.ndarray:
    """Labels -> ``(4, *seg.shape)`` bool channels ``[background, WT, TC, ET]`` in the layout's convention.

    Background is label 0. Ignored labels (WMH's 2, "other pathology") are in no channel, so losses and
    metrics can leave them out with ``regions.any(0)``.
    """
    if layout not in LABEL_CONVENTIONS:
        raise DatasetError(f"layout {layout!r} has no label convention: expected one of {', '.join(LABEL_CONVENTIONS)}")
    labels = np.rint(np.asarray(seg)).astype(np.int16)
    conv = LABEL_CONVENTIONS[layout]
    out = np.empty((4, *labels.shape), dtype=bool)
    out[0] = labels == 0
    for i, region in enumerate(("WT", "TC", "ET"), start=1):
        out[i] = np.isin(labels, conv[region]) if conv[region] else False
    return out


# ----------------------------------------------------------------------------------------------- checks


def validate_dataset(root: str | Path | Sequence[str | Path], layout: str = "auto", check_labels: bool = True) -> dict:
    """Report what a dataset folder holds and what is wrong with it, reading headers (and labels) only.

    Returns ``{"root", "n_cases", "layouts", "modalities", "label_conventions", "cases": [...], "problems": [...]}``;
    a problem is a string naming the case and file (shape or affine differing within a case, unexpected labels,
    a segmentation whose grid differs from the images). Errors that stop discovery raise :class:`DatasetError`.
    """
    import nibabel as nib

    cases = find_cases(root, layout=layout)
    problems: list[str] = []
    rows = []
    for case in cases:
        case_problems: list[str] = []
        geometry = {}
        files = dict(case.images) | ({"seg": case.seg} if case.seg else {})
        for key, path in files.items():
            try:
                img = nib.load(str(path))
                geometry[key] = (tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine))
            except Exception as exc:  # noqa: BLE001 - report any unreadable file, keep going
                case_problems.append(f"{case.id}: cannot read {key} file {path}: {exc}")
        if geometry:
            ref_key = next(iter(geometry))
            ref_shape, ref_affine = geometry[ref_key]
            for key, (shape, affine) in geometry.items():
                if shape != ref_shape:
                    case_problems.append(f"{case.id}: {key} shape {shape} differs from {ref_key} shape {ref_shape}")
                elif not np.allclose(affine, ref_affine, atol=1e-3):
                    case_problems.append(f"{case.id}: {key} affine differs from {ref_key} affine ({files[key]})")
        labels_found: list[int] | None = None
        if check_labels and case.seg is not None and "seg" in geometry:
            labels_found = sorted(int(v) for v in np.unique(np.asarray(nib.load(str(case.seg)).dataobj)))
            conv = LABEL_CONVENTIONS.get(case.layout, {})
            allowed = {0, *conv.get("WT", ()), *IGNORED_LABELS.get(case.layout, ())}
            unexpected = [v for v in labels_found if v not in allowed]
            if unexpected:
                case_problems.append(f"{case.id}: labels {unexpected} in {case.seg} are not in the {case.layout} "
                                     f"convention {sorted(allowed)}")
        problems.extend(case_problems)
        rows.append({
            "id": case.id,
            "subject": case.subject,
            "layout": case.layout,
            "modalities": list(case.modalities),
            "seg": str(case.seg) if case.seg else None,
            "seg_is_prediction": case.seg_is_prediction,
            "labels": labels_found,
            "shape": list(geometry[next(iter(geometry))][0]) if geometry else None,
            "problems": case_problems,
        })
    layouts = Counter(c.layout for c in cases)
    return {
        "root": [str(r) for r in root] if isinstance(root, list | tuple) else str(root),
        "n_cases": len(cases),
        "layouts": dict(layouts),
        "modalities": dict(Counter(m for c in cases for m in c.modalities)),
        "label_conventions": {k: {r: list(v) for r, v in LABEL_CONVENTIONS[k].items()} for k in layouts
                              if k in LABEL_CONVENTIONS},
        "cases_with_seg": sum(c.seg is not None for c in cases),
        "cases": rows,
        "problems": problems,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m model.data PATH [PATH ...] [--layout L]``: print the :func:`validate_dataset` report as JSON."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m model.data", description="Check a dataset folder's cases and files")
    p.add_argument("root", nargs="+", help="dataset folder, or case folders")
    p.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS))
    p.add_argument("--no-labels", action="store_true", help="skip reading the segmentations' label values")
    args = p.parse_args(argv)
    try:
        report = validate_dataset(args.root if len(args.root) > 1 else args.root[0], args.layout,
                                  check_labels=not args.no_labels)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
