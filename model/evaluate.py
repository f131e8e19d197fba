"""Synthesis quality on held-out cases: both protocols of ``spec/evaluation.md``, the paper's Table 1 grid, baselines.

    python -m model.evaluate --checkpoint DIR --data PATH --out DIR [--cases ID ...] [--split val|test|all --seed S]
        [--steps N] [--max-slices N] [--available 1,2,3] [--max-subsets N] [--targets t1,flair]
        [--baselines DIR] [--train-cases ID ...] [--baseline-steps N] [--no-baselines] [--no-dice]
    python -m model.evaluate merge FOLD_A/report.json FOLD_B/report.json --out DIR   # pool cross-validation folds

For every held-out case, every target modality and every subset of the other modalities (grouped by its size,
the paper's M-bar), the MSG-LDM checkpoint and the two baselines (``model.baselines``) synthesize the target
from the same inputs, and each output is scored by

1. the **paper protocol (2D)**: the model's 192x192 axial slices (the case's preprocessing window) that contain
   brain, both images in the model's [0, 1] normalisation (reference: clipped to its [0.5, 99.5] percentiles inside
   the brain mask; prediction: as synthesized, not re-normalised), PSNR and SSIM (Gaussian 11, sigma 1.5,
   data_range 1) per slice, averaged per volume; MAE over the brain mask in the same [0, 1] scale;
2. the **BraSyn protocol (3D)**: on the original grid, each volume clipped to its own [0.5, 99.5] percentiles and
   scaled to [0, 1] independently; 3D SSIM over the whole volume; with a segmentation, the 3D SSIM map averaged
   inside the tumour (WT) and over the rest of the brain (the BraSyn scorer multiplies the volumes by the mask
   instead, which scores ~1 for any prediction); PSNR over the brain mask;
3. **Dice** (when the case has a segmentation and the checkpoint a segmentation decoder): the checkpoint's own
   structure-model segmentation (``Synthesizer.segment``) of the available + synthesized inputs against the
   case's labels (WT, TC, ET, 3D on the grid); ``dice_real_*`` is the same segmenter on all real inputs;
4. **wall time** per synthesized volume (a job that synthesizes k targets counts 1/k of its time for each).

Writes ``report.json`` (every result, the summary, the command and the protocol), ``report.md`` (Table-1-style
tables) and ``figures/<target>.png`` (inputs | synthesized | reference | error).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from nibabel.orientations import io_orientation

from model.data import Case, DatasetError, find_cases, load_case, seg_to_regions, split_cases
from model.io.volume import Volume
from model.metrics import (
    dice_regions,
    mae,
    normalize_in_mask,
    percentile_normalize,
    psnr,
    psnr_slices,
    ssim,
    ssim_in_masks,
    ssim_slices,
)

log = logging.getLogger("model.evaluate")

PSNR_CAP = 100.0  # dB for identical slices (inf), so that means stay finite; reported in the protocol
METHOD_LABELS = {"msgldm": "MSG-LDM", "nearest": "Nearest modality", "unet": "Regression U-Net"}
TABLE_TARGET_ORDER = ("t1", "t2", "t1ce", "flair", "pd")


class EvaluationError(ValueError):
    """Bad evaluation arguments or inputs (no cases, unknown targets, missing checkpoint...)."""


# ===================================================================================== methods


@dataclass
class Method:
    """Something that synthesizes: ``fn(study, targets, steps, seed) -> {target: Volume in [0, 1]}``."""

    name: str
    fn: Callable[[dict[str, Volume], list[str], int | None, int], dict[str, Volume]]

    def run(self, study: dict[str, Volume], targets: list[str], steps: int | None, seed: int
            ) -> tuple[dict[str, Volume], float]:
        t0 = time.perf_counter()
        out = self.fn(study, targets, steps, seed)
        return out, time.perf_counter() - t0


def synthesizer_method(synth) -> Method:
    """Wrap ``model.pipeline.Synthesizer`` (its ``synthesize`` returns a ``SynthesisResult``)."""

    def fn(study, targets, steps, seed):
        result = synth.synthesize(study, targets, steps=steps, seed=seed)
        return dict(result.volumes)

    return Method("msgldm", fn)


def baseline_method(name: str, baseline) -> Method:
    return Method(name, lambda study, targets, steps, seed: baseline.synthesize(study, targets))


# ===================================================================================== geometry helpers


def axial_axis(affine: np.ndarray) -> int:
    """The stored array axis that runs inferior-superior (canonical z)."""
    ornt = io_orientation(np.asarray(affine))
    return int(np.nonzero(ornt[:, 0] == 2)[0][0])


def crop_axial(volumes: dict[str, Volume], seg: Volume | None, max_slices: int
               ) -> tuple[dict[str, Volume], Volume | None]:
    """Keep ``max_slices`` axial slices (the same block of every volume, affines fixed), centred on the tumour
    when ``seg`` labels one (so that the tumour metrics see it), else on the brain."""
    ref = next(iter(volumes.values()))
    axis = axial_axis(ref.affine)
    n = ref.shape[axis]
    if max_slices <= 0 or max_slices >= n:
        return volumes, seg
    focus = np.logical_or.reduce([v.data > 0 for v in volumes.values()])
    if seg is not None and seg.shape == ref.shape and (seg.data > 0).any():
        focus = seg.data > 0
    profile = focus.sum(axis=tuple(a for a in range(3) if a != axis)).astype(float)
    centre = int(round((profile * np.arange(n)).sum() / profile.sum())) if profile.sum() else n // 2
    start = int(np.clip(centre - max_slices // 2, 0, n - max_slices))
    index = [slice(None)] * 3
    index[axis] = slice(start, start + max_slices)
    shift = np.zeros(3)
    shift[axis] = start

    def cut(v: Volume) -> Volume:
        affine = v.affine.copy()
        affine[:3, 3] = v.affine[:3, :3] @ shift + v.affine[:3, 3]
        return Volume(np.ascontiguousarray(v.data[tuple(index)]), affine, dict(v.meta))

    return {k: cut(v) for k, v in volumes.items()}, (cut(seg) if seg is not None else None)


def available_subsets(modalities: Sequence[str], counts: Sequence[int] | None = None,
                      max_per_count: int | None = None, seed: int = 0) -> list[tuple[str, ...]]:
    """Non-empty proper subsets of ``modalities`` whose size is in ``counts`` (default 1..M-1), at most
    ``max_per_count`` of each size (a deterministic, evenly spread choice)."""
    mods = tuple(modalities)
    counts = list(range(1, len(mods))) if counts is None else sorted(set(counts))
    out: list[tuple[str, ...]] = []
    rng = np.random.default_rng(seed)
    for k in counts:
        if not 1 <= k < len(mods):
            continue
        subsets = list(combinations(mods, k))
        if max_per_count is not None and len(subsets) > max_per_count:
            pick = sorted(rng.choice(len(subsets), size=max_per_count, replace=False))
            subsets = [subsets[i] for i in pick]
        out.extend(subsets)
    return out


# ===================================================================================== scoring


@dataclass
class CaseReference:
    """What every method's output is compared with, computed once per case."""

    images: dict[str, Volume]
    brain: np.ndarray  # (X, Y, Z) union over all the case's modalities > 0
    normalized: dict[str, np.ndarray]  # model normalisation in [0, 1] on the reference grid
    brasyn: dict[str, np.ndarray]  # BraSyn percentile normalisation
    tumour: np.ndarray | None  # WT mask on the grid
    regions: np.ndarray | None  # (4, X, Y, Z) bool [background, WT, TC, ET] on the grid
    slices: object  # PreparedStudy of all modalities: the slice window and indices
    keep: np.ndarray  # (S,) slices with brain used by the 2D protocol
    seg_is_prediction: bool


def prepare_reference(case: Case, images: dict[str, Volume], seg: Volume | None, modalities: Sequence[str],
                      preprocess_cfg) -> CaseReference:
    from model.preprocess import prepare_study

    brain = np.logical_or.reduce([v.data > 0 for v in images.values()])
    lo_hi = tuple(preprocess_cfg.clip_percentiles)
    normalized = {m: normalize_in_mask(v.data, brain, lo_hi) for m, v in images.items()}
    brasyn = {m: percentile_normalize(v.data) for m, v in images.items()}
    prep = prepare_study({m: images[m] for m in modalities if m in images}, list(modalities), preprocess_cfg)
    keep = prep.brain_fraction > preprocess_cfg.min_brain_fraction
    if not keep.any():
        keep = prep.brain_fraction > 0
    tumour, regions = None, None
    if seg is not None and case.layout in ("brats2020", "brats2021", "brats2023", "brats-toolkit", "wmh"):
        grid = next(iter(images.values()))
        if seg.shape == grid.shape:
            regions = seg_to_regions(seg.data, case.layout)
            tumour = regions[1]
        else:
            log.warning("case %s: segmentation grid %s differs from the images %s: not used", case.id,
                        seg.shape, grid.shape)
    return CaseReference(images, brain, normalized, brasyn, tumour, regions, prep, keep, case.seg_is_prediction)


def score(pred: Volume, target: str, ref: CaseReference) -> dict[str, float]:
    """All image metrics of one synthesized volume against the case's reference."""
    p = np.asarray(pred.data, dtype=np.float64)
    if p.shape != ref.brain.shape:
        raise EvaluationError(f"prediction for {target} has shape {p.shape}, reference {ref.brain.shape}")
    # 1. paper protocol: model [0, 1] normalisation, 2D slices of the preprocessing window
    y = ref.normalized[target]
    p_sl = ref.slices.to_slices(p, fill=0.0)[ref.keep]
    y_sl = ref.slices.to_slices(y, fill=0.0)[ref.keep]
    ps = np.minimum(psnr_slices(p_sl, y_sl, 1.0), PSNR_CAP)
    out = {
        "paper_psnr": float(ps.mean()),
        "paper_ssim": float(ssim_slices(p_sl, y_sl, 1.0).mean()),
        "mae": mae(p, y, ref.brain),
        "slices": int(ref.keep.sum()),
    }
    # 2. BraSyn protocol: independent percentile normalisation, 3D
    pb, yb = percentile_normalize(p), ref.brasyn[target]
    out["brasyn_ssim"] = ssim(pb, yb, 1.0)
    out["brasyn_psnr"] = min(psnr(pb, yb, 1.0, mask=ref.brain), PSNR_CAP)
    if ref.tumour is not None and ref.tumour.any():
        # the 3D SSIM map averaged inside the tumour and over the rest of the brain. (The BraSyn scorer instead
        # takes the SSIM of the volumes multiplied by the mask, which is ~1 for any prediction: mostly zeros.)
        inside = ssim_in_masks(pb, yb, {"tumour": ref.tumour, "non_tumour": ref.brain & ~ref.tumour}, 1.0)
        out["brasyn_ssim_tumour"] = inside["tumour"]
        out["brasyn_ssim_non_tumour"] = inside["non_tumour"]
    return out


def segmentation_regions(segmenter, study: dict[str, Volume]) -> np.ndarray:
    """The checkpoint's structure-model segmentation (``Synthesizer.segment``) of a study as ``(4, X, Y, Z)``
    bool regions [background, WT, TC, ET] on the study's grid (probability > 0.5)."""
    probs = segmenter.segment(study)
    wt, tc, et = (np.asarray(probs[r].data) > 0.5 for r in ("WT", "TC", "ET"))
    return np.stack([~wt, wt, tc, et])


def to_model_scale(volume: Volume, reference: Volume) -> Volume:
    """A synthesized [0, 1] volume as an input image on the reference grid (used for segmentation)."""
    return Volume(np.asarray(volume.data, dtype=np.float32), reference.affine, {})


# ===================================================================================== the grid


def evaluate_cases(
    cases: Sequence[Case],
    methods: Sequence[Method],
    modalities: Sequence[str],
    preprocess_cfg,
    *,
    steps: int | None = None,
    seed: int = 0,
    counts: Sequence[int] | None = None,
    max_subsets: int | None = None,
    targets: Sequence[str] | None = None,
    max_slices: int | None = None,
    segmenter=None,
    figures_dir: Path | None = None,
    ceilings: list[dict] | None = None,
) -> list[dict]:
    """Run every method on every (case, available subset) and score every synthesized target.

    ``ceilings``, when given, receives per (case, target) the scores of the reference itself in the model's
    [0, 1] scale: the best any [0, 1] output can get under the BraSyn protocol's re-normalisation.
    """
    results: list[dict] = []
    figure_done: set[str] = set()
    for case in cases:
        images, seg = load_case(case)
        images = {m: v for m, v in images.items() if m in modalities}
        if len(images) < 2:
            log.warning("case %s has fewer than two of %s: skipped", case.id, modalities)
            continue
        grid = next(iter(images.values()))
        off = [m for m, v in images.items()
               if v.shape != grid.shape or not np.allclose(v.affine, grid.affine, atol=1e-3)]
        if off:  # e.g. IXI: modalities not co-registered, so there is no voxelwise reference
            log.warning("case %s skipped: %s not on the grid of the other modalities", case.id, off)
            continue
        if max_slices:
            images, seg = crop_axial(images, seg, max_slices)
        ref = prepare_reference(case, images, seg, modalities, preprocess_cfg)
        present = [m for m in modalities if m in images]
        wanted = [t for t in present if targets is None or t in targets]
        real_dice = None
        if segmenter is not None and ref.regions is not None:
            real_dice = dice_regions(segmentation_regions(segmenter, images), ref.regions)
        subsets = available_subsets(present, counts, max_subsets, seed)
        if ceilings is not None:
            for t in wanted:
                best = Volume(ref.normalized[t].astype(np.float32), images[t].affine)
                ceilings.append({"case": case.id, "target": t, **score(best, t, ref)})
        # figures show the largest subset evaluated for each target
        for subset in subsets:
            job_targets = [t for t in wanted if t not in subset]
            if not job_targets:
                continue
            study = {m: images[m] for m in subset}
            preds_by_method = {}
            for method in methods:
                out, seconds = method.run(study, job_targets, steps, seed)
                preds_by_method[method.name] = out
                for t in job_targets:
                    if t not in out:
                        raise EvaluationError(f"method {method.name} did not return target {t}")
                    row = {"case": case.id, "method": method.name, "target": t, "available": list(subset),
                           "n_available": len(subset), "seconds": seconds / len(job_targets),
                           "job_seconds": seconds, "job_targets": len(job_targets)}
                    row.update(score(out[t], t, ref))
                    if segmenter is not None and ref.regions is not None:
                        syn_study = {**study, t: to_model_scale(out[t], images[t])}
                        d = dice_regions(segmentation_regions(segmenter, syn_study), ref.regions)
                        row.update({f"dice_{k}": v for k, v in d.items()})
                        row.update({f"dice_real_{k}": v for k, v in (real_dice or {}).items()})
                    results.append(row)
                    log.info("%s %-8s %-5s from %-18s PSNR %.2f SSIM %.4f 3D-SSIM %.4f (%.1fs)", case.id,
                             method.name, t, "+".join(subset), row["paper_psnr"], row["paper_ssim"],
                             row["brasyn_ssim"], row["seconds"])
            if figures_dir is not None:
                for t in job_targets:
                    key = f"{t}:{len(subset)}"
                    if t not in figure_done and len(subset) == max(len(s) for s in subsets if t not in s):
                        path = figures_dir / f"{t}.png"
                        figure(path, case.id, t, study, {k: v[t] for k, v in preds_by_method.items()}, ref)
                        figure_done.add(t)
                        log.info("figure %s (%s)", path, key)
    return results


# ===================================================================================== summary and report


def summarize(results: Sequence[dict]) -> dict:
    """``summary[method][target][n_available | "all"][metric] = {"mean", "std", "n"}`` over volumes."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["target"], str(r["n_available"]))].append(r)
        groups[(r["method"], r["target"], "all")].append(r)
    summary: dict = {}
    for (method, target, n), rows in sorted(groups.items()):
        metrics = sorted({k for r in rows for k, v in r.items() if isinstance(v, float | int)
                          and not isinstance(v, bool) and k not in ("n_available", "job_targets")})
        cell = {}
        for k in metrics:
            vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
            cell[k] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size)}
        summary.setdefault(method, {}).setdefault(target, {})[n] = cell
    return summary


def _fmt(cell: dict | None, key: str, scale: float = 1.0, digits: int = 2, std: bool = True) -> str:
    if not cell or key not in cell:
        return "-"
    c = cell[key]
    text = f"{c['mean'] * scale:.{digits}f}"
    return f"{text} ± {c['std'] * scale:.{digits}f}" if std and c["n"] > 1 else text


def markdown_report(report: dict) -> str:
    """Table-1-style markdown: rows (M-bar, method), columns per target."""
    summary = report["summary"]
    methods = [m for m in ("msgldm", "nearest", "unet") if m in summary] + \
              [m for m in summary if m not in ("msgldm", "nearest", "unet")]
    targets = [t for t in TABLE_TARGET_ORDER if any(t in summary[m] for m in methods)]
    ns = sorted({n for m in methods for t in summary[m] for n in summary[m][t] if n != "all"}, key=int) + ["all"]
    has_dice = any("dice_mean" in summary[m][t].get(n, {}) for m in methods for t in summary[m] for n in ns)
    has_tumour = any("brasyn_ssim_tumour" in summary[m][t].get(n, {}) for m in methods for t in summary[m] for n in ns)
    lines = [f"# Synthesis quality: {report.get('title', 'evaluation')}", ""]
    lines += [f"- checkpoint: `{report.get('checkpoint')}` ({report.get('version', '?')})",
              f"- cases: {', '.join(report.get('cases', []))}",
              f"- sampling steps: {report.get('steps')}, seed {report.get('seed')}"
              + (f", {report['max_slices']} central axial slices per volume" if report.get("max_slices") else ""),
              f"- command: `{report.get('command', '')}`", ""]
    if report.get("notes"):
        lines += [f"- {n}" for n in report["notes"]] + [""]

    def table(title: str, cols: list[tuple[str, str, float, int]]) -> None:
        head = ["M̄", "Method"] + [f"{t.upper()} {c[0]}" for t in targets for c in cols]
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for n in ns:
            for m in methods:
                row = [n, METHOD_LABELS.get(m, m)]
                for t in targets:
                    cell = summary[m].get(t, {}).get(n)
                    row += [_fmt(cell, key, scale, digits) for _, key, scale, digits in cols]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    paper_cols = [("PSNR", "paper_psnr", 1.0, 2), ("SSIM %", "paper_ssim", 100.0, 2)]
    if has_dice:
        paper_cols.append(("Dice", "dice_mean", 1.0, 3))
    table("Paper protocol (2D slices, [0, 1], data_range 1)", paper_cols)
    brasyn_cols = [("SSIM3D %", "brasyn_ssim", 100.0, 2), ("PSNR brain", "brasyn_psnr", 1.0, 2)]
    if has_tumour:
        brasyn_cols[1:1] = [("SSIM tumour %", "brasyn_ssim_tumour", 100.0, 2),
                            ("SSIM non-tumour %", "brasyn_ssim_non_tumour", 100.0, 2)]
    table("BraSyn protocol (3D, per-volume percentile normalisation)", brasyn_cols)
    if report.get("ceiling"):
        parts = [f"{t.upper()} {_fmt(report['ceiling'][t].get('all'), 'brasyn_ssim', 100.0, 2, std=False)}"
                 for t in targets if t in report["ceiling"]]
        lines += ["Ceiling of this protocol for outputs in the model's [0, 1] scale (the reference itself, "
                  "normalised like the model's output, then scored): SSIM3D % " + ", ".join(parts) + ".", ""]
    table("MAE (brain, [0, 1]) and wall time per synthesized volume (s)",
          [("MAE", "mae", 1.0, 4), ("s/vol", "seconds", 1.0, 2)])
    if has_dice:
        lines += ["Dice: the checkpoint's structure-model segmentation of the available + synthesized inputs, "
                  "mean of WT, TC, ET" + (" against a *predicted* segmentation (BraTS-Toolkit fusion), not expert "
                                          "truth" if report.get("seg_is_prediction") else "") + ".", ""]
    if report.get("figures"):
        lines += ["## Figures", ""] + [f"![{t}]({p})" for t, p in report["figures"].items()] + [""]
    return "\n".join(lines)


def figure(path: Path, case_id: str, target: str, study: dict[str, Volume], preds: dict[str, Volume],
           ref: CaseReference) -> Path:
    """One PNG: inputs | each method's synthesis | reference, and each method's |error| below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prep = ref.slices
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


# ===================================================================================== CLI


def _parse_counts(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise EvaluationError(f"--available takes comma-separated integers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="MSG-LDM checkpoint directory")
    p.add_argument("--data", required=True, nargs="+", help="dataset folder(s) or case folders")
    p.add_argument("--layout", default="auto")
    p.add_argument("--cases", nargs="*", help="case ids to evaluate (default: the --split)")
    p.add_argument("--split", choices=("val", "test", "all"), default="all",
                   help="val/test: the split recorded in the checkpoint's metrics.json, else computed with --seed")
    p.add_argument("--seed", type=int, default=0,
                   help="split seed (when the checkpoint records none) and sampling seed")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--out", required=True, help="output folder for report.json, report.md, figures/")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's default)")
    p.add_argument("--max-slices", type=int, default=None, help="evaluate this many central axial slices per case")
    p.add_argument("--available", default=None, help="numbers of available modalities, e.g. 1,2,3 (default all)")
    p.add_argument("--max-subsets", type=int, default=None, help="at most this many input subsets per number")
    p.add_argument("--targets", default=None, help="comma-separated target modalities (default all)")
    p.add_argument("--baselines", default=None, help="folder of trained baselines (loaded, or trained and saved)")
    p.add_argument("--train-cases", nargs="*", help="case ids the baselines train on (default: the train split, "
                   "or every case not evaluated)")
    p.add_argument("--baseline-steps", type=int, default=500, help="regression U-Net training steps")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-dice", action="store_true", help="skip the structure-model segmentation Dice")
    p.add_argument("--title", default=None)
    return p


def _load_baselines(args, cfg, train_cases: list[Case]) -> list[Method]:
    """The two baselines from ``--baselines`` (default ``OUT/baselines``), fitted/trained on ``train_cases`` and
    saved there when absent. The U-Net takes the checkpoint's structure-encoder widths and preprocessing."""
    from dataclasses import asdict

    from model.baselines import NearestModalityBaseline, RegressionUNetBaseline, RegressionUNetConfig

    modalities, preprocess_cfg = list(cfg.modalities), cfg.preprocess
    root = Path(args.baselines) if args.baselines else Path(args.out) / "baselines"
    methods = []
    if (root / "nearest" / "baseline.json").is_file():
        nearest = NearestModalityBaseline.load(root / "nearest")
    else:
        if not train_cases:
            raise EvaluationError("no training cases to fit the baselines: give --train-cases or --baselines")
        nearest = NearestModalityBaseline.fit(train_cases, modalities, tuple(preprocess_cfg.clip_percentiles))
        nearest.save(root / "nearest")
    methods.append(baseline_method("nearest", nearest))
    if (root / "unet" / "config.json").is_file():
        unet = RegressionUNetBaseline.load(root / "unet")
    else:
        if not train_cases:
            raise EvaluationError("no training cases to train the regression U-Net: give --train-cases or --baselines")
        log.info("training the regression U-Net baseline (%d steps, one thread) on %s", args.baseline_steps,
                 [c.id for c in train_cases])
        ucfg = RegressionUNetConfig(modalities=tuple(modalities), channels=tuple(cfg.structure.channels),
                                    steps=args.baseline_steps, seed=args.seed, preprocess=asdict(preprocess_cfg))
        unet = RegressionUNetBaseline.train(train_cases, ucfg)
        unet.save(root / "unet")
    methods.append(baseline_method("unet", unet))
    return methods


def recorded_split(checkpoint: str | Path) -> dict[str, list[str]] | None:
    """The subject-level split the training run recorded in ``metrics.json`` (``{"train": [...], "val": [...]}``,
    maybe ``"test"``), or None when the checkpoint has none."""
    path = Path(checkpoint) / "metrics.json"
    try:
        split = json.loads(path.read_text()).get("split") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(split, dict) or not isinstance(split.get("train"), list):
        return None
    return {k: [str(c) for c in v] for k, v in split.items() if k in ("train", "val", "test") and isinstance(v, list)}


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
    from model.checkpoint import checkpoint_version, read_config

    ckpt = Path(args.checkpoint)
    cfg = read_config(ckpt)
    modalities = list(cfg.modalities)
    all_cases = find_cases(args.data if len(args.data) > 1 else args.data[0], layout=args.layout)
    by_id = {c.id: c for c in all_cases}
    if args.cases:
        unknown = [c for c in args.cases if c not in by_id]
        if unknown:
            raise EvaluationError(f"cases {unknown} not found under {args.data}; found {sorted(by_id)}")
        eval_cases = [by_id[c] for c in args.cases]
        train_pool = [c for c in all_cases if c.id not in set(args.cases)]
    elif args.split == "all":
        eval_cases, train_pool = all_cases, []
    elif (recorded := recorded_split(ckpt)) is not None and args.split in recorded:
        # the split the training run wrote into the checkpoint's record wins: no leakage through a different seed
        missing = [c for c in recorded[args.split] + recorded["train"] if c not in by_id]
        if missing:
            log.warning("cases %s of the checkpoint's recorded split are not under %s", missing, args.data)
        eval_cases = [by_id[c] for c in recorded[args.split] if c in by_id]
        train_pool = [by_id[c] for c in recorded["train"] if c in by_id]
        log.info("using the checkpoint's recorded split: %d %s, %d train", len(eval_cases), args.split, len(train_pool))
    else:
        splits = split_cases(all_cases, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction)
        eval_cases, train_pool = splits[args.split], splits["train"]
    if args.train_cases is not None and len(args.train_cases) > 0:
        unknown = [c for c in args.train_cases if c not in by_id]
        if unknown:
            raise EvaluationError(f"training cases {unknown} not found under {args.data}")
        train_pool = [by_id[c] for c in args.train_cases]
    overlap = {c.id for c in eval_cases} & {c.id for c in train_pool}
    if overlap:
        log.warning("cases %s are both evaluated and used to fit the baselines", sorted(overlap))
    if not eval_cases:
        raise EvaluationError("no cases to evaluate")
    if args.max_slices is not None and args.max_slices < 11:
        raise EvaluationError(f"--max-slices {args.max_slices}: the 3D SSIM window needs at least 11 slices")
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    if targets and any(t not in modalities for t in targets):
        raise EvaluationError(f"targets {targets} must be among the checkpoint's modalities {modalities}")

    from model.pipeline import Synthesizer

    synth = Synthesizer.from_pretrained(ckpt)
    methods = [synthesizer_method(synth)]
    if not args.no_baselines:
        methods += _load_baselines(args, cfg, [c for c in train_pool if all(m in c.images for m in modalities)])
    segmenter = None
    if not args.no_dice and cfg.structure.segmentation and any(c.seg is not None for c in eval_cases):
        segmenter = synth
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ceilings: list[dict] = []
    results = evaluate_cases(
        eval_cases, methods, modalities, cfg.preprocess, steps=args.steps, seed=args.seed,
        counts=_parse_counts(args.available), max_subsets=args.max_subsets, targets=targets,
        max_slices=args.max_slices, segmenter=segmenter, figures_dir=out / "figures", ceilings=ceilings)
    input_dependence_figure(results, out / "figures" / "input_dependence.png")
    figures = {p.stem: f"figures/{p.name}" for p in sorted((out / "figures").glob("*.png"))}
    report = {
        "title": args.title or f"{cfg.name} checkpoint on {', '.join(c.id for c in eval_cases)}",
        "checkpoint": str(ckpt),
        "version": _safe(lambda: checkpoint_version(ckpt)),
        "command": "python -m model.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": [c.id for c in eval_cases],
        "baseline_train_cases": [c.id for c in train_pool],
        "seg_is_prediction": any(c.seg_is_prediction for c in eval_cases if c.seg is not None),
        "steps": args.steps if args.steps is not None else cfg.diffusion.default_steps,
        "seed": args.seed,
        "max_slices": args.max_slices,
        "protocol": {
            "paper": "2D axial slices of the model's 192x192 window with brain fraction > "
                     f"{cfg.preprocess.min_brain_fraction}, [0, 1] model normalisation (reference clipped to "
                     f"{list(cfg.preprocess.clip_percentiles)} percentiles in the brain mask), PSNR/SSIM data_range 1, "
                     f"Gaussian window 11 sigma 1.5, mean over slices per volume; PSNR capped at {PSNR_CAP} dB",
            "brasyn": "3D on the original grid, each volume clipped to its own [0.5, 99.5] percentiles (>= 0) and "
                      "scaled to [0, 1]; SSIM over the whole volume; tumour / non-tumour SSIM = the 3D SSIM map "
                      "averaged inside the WT mask / over the rest of the brain; PSNR over the brain mask, "
                      "data_range 1",
            "mae": "mean |prediction - reference| over the brain mask, model [0, 1] normalisation",
            "seconds": "wall time of the synthesis call divided by the number of targets it produced",
        },
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "results": results,
        "summary": summarize(results),
        "ceiling": summarize([{**c, "method": "ceiling", "n_available": 0} for c in ceilings]).get("ceiling", {}),
        "figures": figures,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / "report.md").write_text(markdown_report(report))
    return report


def _safe(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the version string is informative only
        return f"unknown ({exc})"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def merge_reports(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> dict:
    """Pool several reports (e.g. the folds of a cross-validation) into one: results concatenated, summary and
    ceiling recomputed, each fold's checkpoint and command kept. Writes ``report.json`` and ``report.md``."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    if not reports:
        raise EvaluationError("merge needs at least one report.json")
    results = [{**r, "fold": i} for i, rep in enumerate(reports) for r in rep["results"]]
    ceilings = []
    for rep in reports:
        for t, cells in rep.get("ceiling", {}).items():
            ceilings.append({"target": t, "method": "ceiling", "n_available": 0,
                             **{k: v["mean"] for k, v in cells.get("all", {}).items()}})
    merged = {
        "title": title or "merged: " + "; ".join(r.get("title", "") for r in reports),
        "checkpoint": ", ".join(str(r.get("checkpoint")) for r in reports),
        "version": ", ".join(str(r.get("version")) for r in reports),
        "command": " ; ".join(r.get("command", "") for r in reports),
        "cases": [c for r in reports for c in r.get("cases", [])],
        "folds": [{k: r.get(k) for k in ("checkpoint", "version", "command", "cases", "baseline_train_cases",
                                          "steps", "max_slices", "wall_seconds")} for r in reports],
        "seg_is_prediction": any(r.get("seg_is_prediction") for r in reports),
        "steps": reports[0].get("steps"),
        "seed": reports[0].get("seed"),
        "max_slices": reports[0].get("max_slices"),
        "protocol": reports[0].get("protocol"),
        "results": results,
        "summary": summarize(results),
        "ceiling": summarize(ceilings).get("ceiling", {}),
        "figures": {},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if input_dependence_figure(results, out / "figures" / "input_dependence.png") is not None:
        merged["figures"]["input_dependence"] = "figures/input_dependence.png"
    (out / "report.json").write_text(json.dumps(merged, indent=1, default=_json_default))
    (out / "report.md").write_text(markdown_report(merged))
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # python -m model.evaluate merge A/report.json B/report.json --out DIR
        mp = argparse.ArgumentParser(prog="python -m model.evaluate merge", description=merge_reports.__doc__)
        mp.add_argument("reports", nargs="+")
        mp.add_argument("--out", required=True)
        mp.add_argument("--title", default=None)
        margs = mp.parse_args(argv[1:])
        merged = merge_reports(margs.reports, margs.out, margs.title)
        print(f"wrote {Path(margs.out) / 'report.md'} ({len(merged['results'])} results)")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args, argv)
    except (EvaluationError, DatasetError) as exc:
        parser.error(str(exc))
        return 2
    print(f"wrote {Path(args.out) / 'report.md'} ({len(report['results'])} results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
