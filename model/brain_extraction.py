"""Brain extraction with deepbet (Fisch et al. 2024, MIT; its two TorchScript networks ship in the wheel, so it
works offline): a 1 mm T1-like :class:`~model.io.volume.Volume` -> boolean brain mask on its grid.

Kept apart from :mod:`model.native` (torch-free) because it runs a network.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import BrainExtractionError
from model.io.volume import Volume


def weights() -> dict[str, Path]:
    """deepbet's shipped weight files (``data/models`` beside the package, where its wheel installs them)."""
    import deepbet.utils

    root = Path(deepbet.utils.DATA_PATH) / "models"
    return {"model.pt": root / "model.pt", "bbox_model.pt": root / "bbox_model.pt"}


@lru_cache(maxsize=1)
def _extractor(cuda: bool) -> Any:
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not cuda)


@lru_cache(maxsize=1)
def describe() -> dict[str, Any]:
    """What record.json says about the tool: version and the SHA-256 of each weight file."""
    from importlib.metadata import version

    sums = {}
    for name, path in weights().items():
        sums[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"tool": "deepbet", "version": version("deepbet"), "threshold": 0.5, "weights_sha256": sums}


def extract_brain(volume: Volume, name: str = "", device: str | None = None) -> np.ndarray:
    """Boolean brain mask of ``volume`` (any orientation; deepbet works in RAS and maps back), largest component,
    holes filled. Raises :class:`BrainExtractionError` when deepbet finds no head."""
    import nibabel as nib
    import torch

    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    img = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), volume.affine)
    try:
        with torch.inference_mode():
            _, mask, _ = _extractor(cuda).run(img, threshold=0.5)
    except (AssertionError, ValueError, RuntimeError, IndexError) as exc:
        raise BrainExtractionError(f"{name}: deepbet found no brain ({type(exc).__name__}: {exc})"[:400],
                                   series=name) from exc
    out = np.asarray(mask.dataobj) > 0
    if out.shape != volume.shape:
        raise BrainExtractionError(f"{name}: deepbet returned a mask of shape {out.shape}, not {volume.shape}",
                                   series=name)
    return out
