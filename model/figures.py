"""Figures of an evaluation (``model.evaluate``): one case's inputs | syntheses | reference | errors per target, and
the input-dependence figure (PSNR by input subset, per target and method)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.io.volume import Volume
from model.tables import METHOD_LABELS, TABLE_TARGET_ORDER

if TYPE_CHECKING:
    from model.evaluate import CaseReference


def figure(path: Path, case_id: str, target: str, study: dict[str, Volume], preds: dict[str, Volume],
           ref: CaseReference) -> Path:
    """One PNG: inputs | each method's synthesis | reference, and each method's |error| below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prep = ref.window.slices
    score_slice = prep.to_slices(ref.tumour, fill=False).reshape(len(prep.mask), -1).sum(1) \
        if ref.tumour is not None else None
    if score_slice is None or score_slice.max() == 0:
        score_slice = prep.mask.reshape(len(prep.mask), -1).sum(1)
    k = int(np.argmax(score_slice))

    def cut(a: np.ndarray) -> np.ndarray:
        return np.rot90(prep.to_slices(a, fill=0.0)[k])

    inputs = [(f"input {m}", cut(ref.normalized[m])) for m in study]
    reference = cut(ref.normalized[target])
    synth = [(f"{METHOD_LABELS.get(n, n)}", cut(np.asarray(v.data, dtype=np.float64))) for n, v in preds.items()]
    cols = max(len(inputs) + 1, len(synth))
    fig, axes = plt.subplots(3, cols, figsize=(2.0 * cols, 6.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, (title, img) in enumerate([*inputs, (f"reference {target}", reference)]):
        axes[0, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(title, fontsize=8)
    for j, (title, img) in enumerate(synth):
        axes[1, j].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[1, j].set_title(title, fontsize=8)
        axes[2, j].imshow(np.abs(img - reference), cmap="magma", vmin=0, vmax=0.5)
        axes[2, j].set_title(f"|error|, slice MAE {np.abs(img - reference).mean():.3f}", fontsize=8)
    fig.suptitle(f"{case_id}: {target} from {'+'.join(study)}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def input_dependence_figure(results: Sequence[dict], path: Path) -> Path | None:
    """One panel per target: mean 2D PSNR over the cases for every input subset evaluated (by size), one marker
    per method: how much the synthesis depends on which inputs it gets. None when fewer than two subsets."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[float]] = defaultdict(list)
    for r in results:
        groups[(r["target"], r["method"], tuple(r["available"]))].append(r["paper_psnr"])
    subsets_of = {t: {k[2] for k in groups if k[0] == t} for t in TABLE_TARGET_ORDER}
    targets = [t for t in TABLE_TARGET_ORDER if len(subsets_of[t]) >= 2]  # targets seen with several input sets
    if not targets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ("msgldm", "nearest", "unet") if any(k[1] == m for k in groups)]
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        subsets = sorted(subsets_of[t], key=lambda s: (len(s), s))
        for i, m in enumerate(methods):
            ys = [float(np.mean(groups[(t, m, s)])) if (t, m, s) in groups else np.nan for s in subsets]
            ax.plot(np.arange(len(subsets)) + (i - 1) * 0.12, ys, "o", label=METHOD_LABELS.get(m, m), ms=5)
        ax.set_xticks(range(len(subsets)), ["+".join(s) for s in subsets], rotation=60, fontsize=7)
        ax.set_xlim(-0.5, len(subsets) - 0.5)
        ax.set_title(f"{t.upper()}: 2D PSNR by inputs", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("dB (mean over cases)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
