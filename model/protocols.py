"""The two scoring protocols of ``spec/evaluation.md``, one function each (torch-free).

``model.evaluate`` scores held-out cases with both (the numbers a model version carries in the registry), and
the worker scores a validation-mode job with the same functions, so that a job's "PSNR" and a model version's
"PSNR" are the same number computed the same way.

* **Paper protocol (2D)**: the model's axial slices of the case's preprocessing window that hold brain; the
  reference in the model's [0, 1] normalisation (clipped to its [0.5, 99.5] percentiles inside the brain mask),
  the prediction as synthesized (never re-normalised); PSNR and SSIM (Gaussian 11, sigma 1.5, data_range 1) per
  slice, averaged; MAE over the brain mask in the same scale.
* **BraSyn protocol (3D)**: on the original grid, each volume clipped to its own [0.5, 99.5] percentiles and
  scaled to [0, 1] independently; 3D SSIM over the whole volume, PSNR over the brain mask; with a tumour mask
  also the 3D SSIM map averaged inside it and over the rest of the brain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.io.volume import Volume
from model.metrics import (
    mae,
    normalize_in_mask,
    percentile_normalize,
    psnr,
    psnr_slices,
    ssim,
    ssim_in_masks,
    ssim_slices,
)

PSNR_CAP = 100.0  # dB for identical slices (inf), so that means stay finite
PAPER = ("paper protocol (2D): the model's axial slices with brain; reference clipped to its [0.5, 99.5] "
         "percentiles inside the brain mask and scaled to [0, 1], prediction as synthesized; PSNR and SSIM "
         "(Gaussian 11, sigma 1.5) per slice, averaged; MAE over the brain mask (model/protocols.py)")
BRASYN = ("BraSyn protocol (3D): each volume clipped to its own [0.5, 99.5] percentiles and scaled to [0, 1]; "
          "SSIM 3D over the volume, PSNR over the brain mask (model/protocols.py)")


@dataclass(frozen=True)
class PaperWindow:
    """The slices the paper protocol scores: the preprocessing window of a study and its slices with brain."""

    slices: object  # model.preprocess.PreparedStudy: to_slices()
    keep: np.ndarray  # (S,) bool


def paper_window(images: dict[str, Volume], modalities: Sequence[str], preprocess_cfg) -> PaperWindow:
    """The window of ``images`` (every volume of the case, on one grid) as the model cuts it."""
    from model.preprocess import prepare_study

    prep = prepare_study({m: images[m] for m in modalities if m in images}, list(modalities), preprocess_cfg)
    keep = prep.brain_fraction > preprocess_cfg.min_brain_fraction
    if not keep.any():
        keep = prep.brain_fraction > 0
    return PaperWindow(prep, keep)


def paper_reference(truth: np.ndarray, brain: np.ndarray, clip_percentiles: Sequence[float]) -> np.ndarray:
    """The reference in the model's [0, 1] normalisation."""
    return normalize_in_mask(np.asarray(truth, dtype=np.float64), brain, tuple(clip_percentiles))


def paper_protocol(pred: np.ndarray, reference: np.ndarray, brain: np.ndarray, window: PaperWindow
                   ) -> dict[str, float]:
    """``paper_psnr``, ``paper_ssim``, ``mae``, ``slices`` and the mean intensity inside the brain of the prediction
    and of the reference (``brain_mean``, ``brain_mean_reference``: the volume's level, which a per-volume
    percentile normalisation sets) of a [0, 1] prediction against ``paper_reference``."""
    p = np.asarray(pred, dtype=np.float64)
    p_sl = window.slices.to_slices(p, fill=0.0)[window.keep]
    y_sl = window.slices.to_slices(reference, fill=0.0)[window.keep]
    return {
        "paper_psnr": float(np.minimum(psnr_slices(p_sl, y_sl, 1.0), PSNR_CAP).mean()),
        "paper_ssim": float(ssim_slices(p_sl, y_sl, 1.0).mean()),
        "mae": mae(p, reference, brain),
        "brain_mean": float(p[brain].mean()) if brain.any() else float("nan"),
        "brain_mean_reference": float(np.asarray(reference)[brain].mean()) if brain.any() else float("nan"),
        "slices": int(window.keep.sum()),
    }


def brasyn_reference(truth: np.ndarray) -> np.ndarray:
    """The reference in the BraSyn percentile normalisation."""
    return percentile_normalize(np.asarray(truth, dtype=np.float64))


def brasyn_protocol(pred: np.ndarray, reference: np.ndarray, brain: np.ndarray, tumour: np.ndarray | None = None
                    ) -> dict[str, float]:
    """``brasyn_ssim``, ``brasyn_psnr`` (and with a tumour mask ``brasyn_ssim_tumour`` / ``_non_tumour``) of a
    prediction against ``brasyn_reference``."""
    pb = percentile_normalize(np.asarray(pred, dtype=np.float64))
    out = {"brasyn_ssim": ssim(pb, reference, 1.0), "brasyn_psnr": min(psnr(pb, reference, 1.0, mask=brain), PSNR_CAP)}
    if tumour is not None and tumour.any():
        # the 3D SSIM map averaged inside the tumour and over the rest of the brain. (The BraSyn scorer instead
        # takes the SSIM of the volumes multiplied by the mask, which is ~1 for any prediction: mostly zeros.)
        inside = ssim_in_masks(pb, reference, {"tumour": tumour, "non_tumour": brain & ~tumour}, 1.0)
        out["brasyn_ssim_tumour"] = inside["tumour"]
        out["brasyn_ssim_non_tumour"] = inside["non_tumour"]
    return out
