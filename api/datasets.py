"""Dataset validation before a training run is queued: ``python -m model.data`` in a subprocess (headers and
labels only, under a timeout: a slow or hostile dataset costs that process, not the API), plus the preset's
modality check."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess  # nosec B404 - fixed argv, no shell
import sys
import tempfile
from pathlib import Path
from typing import Any

from api.core.errors import ProblemError
from api.core.settings import ROOT, get_settings
from api.core.storage import Storage, download_prefix
from api.core.training import DATASET_LAYOUTS as LAYOUTS
from api.schemas import DatasetReport, DatasetSpec
from model.config import PRESETS_DIR, load_preset
from model.errors import ConfigError

PRESET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def preset_modalities(preset: str) -> list[str]:
    """The modalities a preset's model is built for (``model.config``, torch-free); only preset names, no paths."""
    if PRESET_NAME.fullmatch(preset):
        with contextlib.suppress(ConfigError):
            return list(load_preset(preset).modalities)
    known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ProblemError(422, "unknown_preset", f"no preset {preset!r}; known presets: {', '.join(known)}")


def _run_checker(roots: list[str], layout: str) -> dict[str, Any] | str:
    """The model package's dataset check as JSON, or the reason it could not read the dataset."""
    try:
        out = subprocess.run([sys.executable, "-m", "model.data", *roots, "--layout", layout], cwd=ROOT,  # nosec B603
                             capture_output=True, text=True, timeout=get_settings().training.validate_timeout_seconds)
    except subprocess.TimeoutExpired:
        return "the dataset check took too long (MSGLDM_TRAINING__VALIDATE_TIMEOUT_SECONDS)"
    if out.returncode in (0, 1) and out.stdout.strip():
        return json.loads(out.stdout)  # type: ignore[no-any-return]
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[-1].removeprefix("error: ") if lines else f"the dataset check failed ({out.returncode})"


def validate(spec: DatasetSpec, storage: Storage, modalities: list[str] | None = None) -> DatasetReport:
    """Cases found, modalities per case, label convention, geometry problems; ``valid`` when training can use it."""
    if spec.layout not in LAYOUTS:
        raise ProblemError(422, "invalid_request", f"unknown layout {spec.layout!r}: expected brats, wmh or ixi")
    with tempfile.TemporaryDirectory(prefix="msgldm-dataset-") as tmp:
        if spec.prefix is not None:
            if not download_prefix(storage, spec.prefix, Path(tmp)):
                return DatasetReport(valid=False, cases=0, modalities={}, labels={},
                                     problems=[f"no objects under the prefix {spec.prefix!r}"])
            root = tmp
        else:
            root = spec.path or ""
            if not Path(root).is_dir():
                return DatasetReport(valid=False, cases=0, modalities={}, labels={},
                                     problems=[f"{root} is not a folder on this host (the API and the training "
                                               "workers must see the same dataset path)"])
        report = _run_checker([root], LAYOUTS[spec.layout])
    if isinstance(report, str):
        return DatasetReport(valid=False, cases=0, modalities={}, labels={}, problems=[report])
    problems = list(report["problems"])
    if report["n_cases"] == 0:
        problems.append("no cases found")
    if spec.layout == "brats":
        problems += [f"{c['id']}: layout {c['layout']} is not a BraTS layout" for c in report["cases"]
                     if not c["layout"].startswith("brats")]
    for case in report["cases"]:
        lacking = [m for m in modalities or [] if m not in case["modalities"]]
        if lacking:
            problems.append(f"{case['id']}: lacks {', '.join(lacking)}, which the model needs")
    return DatasetReport(valid=not problems, cases=report["n_cases"], modalities=report["modalities"],
                         labels=report["label_conventions"], layouts=report["layouts"], problems=problems,
                         case_details=report["cases"][:200])
