"""Training data: cases -> preprocessed axial slices in memory, and the missing-modality masking sampler; the
views of a slice stack (mirrored, shifted) that stage 2's mirror augmentation and test-time averaging use.

Tensors start here (``model.data`` and ``model.preprocess`` are numpy). Each item is a dict:
``x (M, H, W)`` float32 in [-1, 1], ``present (M,)`` bool (modality exists in the case), ``seg (C, H, W)`` float
regions [background, WT, TC, ET], ``has_seg`` bool, ``index`` int.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from model.config import MSGLDMConfig
from model.data import LABEL_CONVENTIONS, Case, load_case, seg_to_regions
from model.preprocess import prepare_study

log = logging.getLogger(__name__)


class SliceDataset(Dataset):
    """All brain-containing axial slices of ``cases`` (float16 in memory), preprocessed as at inference."""

    def __init__(self, cases: Sequence[Case], cfg: MSGLDMConfig) -> None:
        self.cfg = cfg
        xs, present, segs, has_seg, origin = [], [], [], [], []
        self.spacings: list[tuple[float, ...]] = []
        m, size, classes = len(cfg.modalities), cfg.preprocess.image_size, cfg.structure.seg_classes
        for case in cases:
            images, seg = load_case(case)
            vols = {k: v for k, v in images.items() if k in cfg.modalities}
            if not vols:
                log.warning("case %s has none of the modalities %s: skipped", case.id, cfg.modalities)
                continue
            prep = prepare_study(vols, cfg.modalities, cfg.preprocess)
            keep = np.nonzero(prep.brain_fraction > cfg.preprocess.min_brain_fraction)[0]
            xs.append(prep.x[keep].astype(np.float16))
            present.append(np.tile(np.array(prep.available, dtype=bool), (len(keep), 1)))
            regions = np.zeros((len(keep), classes, size, size), dtype=bool)
            labelled = False
            if seg is not None and case.layout in LABEL_CONVENTIONS and classes == 4:
                if seg.shape == next(iter(vols.values())).shape:
                    labels = prep.to_slices(seg.data, fill=0)[keep]
                    regions = np.moveaxis(seg_to_regions(labels, case.layout), 0, 1)
                    labelled = True
                else:
                    log.warning("case %s: segmentation shape %s differs from the images: ignored", case.id, seg.shape)
            segs.append(regions)
            has_seg.append(np.full(len(keep), labelled))
            origin += [(case.id, int(z)) for z in prep.slice_indices[keep]]
            self.spacings.append(next(iter(vols.values())).spacing)
        if not xs:
            raise ValueError("no training slices: none of the cases had usable images")
        self.x = torch.from_numpy(np.concatenate(xs))
        self.present = torch.from_numpy(np.concatenate(present))
        self.seg = torch.from_numpy(np.concatenate(segs))
        self.has_seg = torch.from_numpy(np.concatenate(has_seg))
        self.origin = origin  # (case id, canonical slice index) per item
        self.case_ids = [c.id for c in cases]
        if self.x.shape[1] != m:
            raise ValueError(f"expected {m} modality channels, the slices have {self.x.shape[1]}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "x": self.x[i].float(),
            "present": self.present[i],
            "seg": self.seg[i].float(),
            "has_seg": self.has_seg[i],
            "index": torch.tensor(i),
        }


class ModalityMasker:
    """Missing-modality simulation (spec, stage 1/2): per sample the number of available modalities is uniform in
    1..(number present), the subset uniformly random among the present ones."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, present: torch.Tensor) -> torch.Tensor:
        """``present (B, M)`` bool -> ``available (B, M)`` bool, a non-empty subset of ``present`` per row."""
        b, m = present.shape
        out = torch.zeros(b, m, dtype=torch.bool)
        pres = present.cpu()
        for i in range(b):
            idx = torch.nonzero(pres[i]).flatten()
            if len(idx) == 0:
                continue
            k = int(torch.randint(1, len(idx) + 1, (1,), generator=self.generator))
            chosen = idx[torch.randperm(len(idx), generator=self.generator)[:k]]
            out[i, chosen] = True
        return out.to(present.device)


# ---------------------------------------------------------------------------------------------- views of a slice stack


def test_time_views(n: int, shift: int) -> list[tuple[bool, int]]:
    """The first ``n`` (1, 2 or 4) test-time views of a slice stack as (mirrored left-right, shift in pixels): the
    slices, mirrored, shifted by ``shift`` down and right, both. A synthesizer averages its output over the views,
    each mapped back (``diffusion.test_time_views``; the paper: the slices alone)."""
    if n not in (1, 2, 4):
        raise ValueError(f"test-time views must be 1, 2 or 4, got {n}")
    return [(False, 0), (True, 0), (False, shift), (True, shift)][:n]


def view_forward(x: torch.Tensor, view: tuple[bool, int]) -> torch.Tensor:
    """Slices ``(..., H, W)`` as the view sees them: mirrored left-right (H is the RAS x axis of
    :func:`model.preprocess.prepare_study`'s slices), then cyclically shifted (the slice border is background)."""
    mirrored, shift = view
    x = x.flip(-2) if mirrored else x
    return torch.roll(x, (shift, shift), (-2, -1)) if shift else x


def view_back(x: torch.Tensor, view: tuple[bool, int]) -> torch.Tensor:
    """The inverse of :func:`view_forward`."""
    mirrored, shift = view
    x = torch.roll(x, (-shift, -shift), (-2, -1)) if shift else x
    return x.flip(-2) if mirrored else x
