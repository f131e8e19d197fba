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
tables) and ``figures/<target>.png`` (inputs | synthesized | reference | error). This module runs the grid; the
protocols are ``model.protocols`` (shared with the worker's job report), the tables and fold merging
``model.tables``, the figures ``model.figures``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from nibabel.orientations import io_orientation

from model.data import Case, DatasetError, find_cases, load_case, seg_to_regions, split_cases
from model.errors import EvaluationError
from model.figures import figure, input_dependence_figure
from model.io.volume import Volume
from model.metrics import dice_regions
from model.protocols import (
    PSNR_CAP,
    PaperWindow,
    brasyn_protocol,
    brasyn_reference,
    paper_protocol,
    paper_reference,
    paper_window,
)
from model.tables import json_default, markdown_report, merge_reports, summarize

log = logging.getLogger("model.evaluate")

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
    window: PaperWindow  # the slices the 2D protocol scores
    seg_is_prediction: bool


def prepare_reference(case: Case, images: dict[str, Volume], seg: Volume | None, modalities: Sequence[str],
                      preprocess_cfg) -> CaseReference:
    brain = np.logical_or.reduce([v.data > 0 for v in images.values()])
    normalized = {m: paper_reference(v.data, brain, preprocess_cfg.clip_percentiles) for m, v in images.items()}
    brasyn = {m: brasyn_reference(v.data) for m, v in images.items()}
    window = paper_window(images, modalities, preprocess_cfg)
    tumour, regions = None, None
    if seg is not None and case.layout in ("brats2020", "brats2021", "brats2023", "brats-toolkit", "wmh"):
        grid = next(iter(images.values()))
        if seg.shape == grid.shape:
            regions = seg_to_regions(seg.data, case.layout)
            tumour = regions[1]
        else:
            log.warning("case %s: segmentation grid %s differs from the images %s: not used", case.id,
                        seg.shape, grid.shape)
    return CaseReference(images, brain, normalized, brasyn, tumour, regions, window, case.seg_is_prediction)


def score(pred: Volume, target: str, ref: CaseReference) -> dict[str, float]:
    """All image metrics of one synthesized volume against the case's reference: both protocols
    (``model.protocols``)."""
    p = np.asarray(pred.data, dtype=np.float64)
    if p.shape != ref.brain.shape:
        raise EvaluationError(f"prediction for {target} has shape {p.shape}, reference {ref.brain.shape}")
    return {**paper_protocol(p, ref.normalized[target], ref.brain, ref.window),
            **brasyn_protocol(p, ref.brasyn[target], ref.brain, ref.tumour)}


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
    autoencoder=None,
    autoencoded: list[dict] | None = None,
) -> list[dict]:
    """Run every method on every (case, available subset) and score every synthesized target.

    ``ceilings``, when given, receives per (case, target) the scores of the reference itself in the model's
    [0, 1] scale: the best any [0, 1] output can get under the BraSyn protocol's re-normalisation.
    ``autoencoded``, with ``autoencoder`` (a ``Synthesizer``), receives per (case, target) the scores of the target
    through the checkpoint's autoencoder (``Synthesizer.autoencode``): what MSG-LDM would score with a perfect
    stage 2, so a gap to a baseline splits into the autoencoder's part and the latent prediction's.
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
        if autoencoder is not None and autoencoded is not None:
            recon = autoencoder.autoencode(images)
            for t in wanted:
                autoencoded.append({"case": case.id, "target": t, **score(recon[t], t, ref)})
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
    p.add_argument("--baseline-views", type=int, default=None, choices=(1, 2, 4),
                   help="test-time views of the regression U-Net (default: the checkpoint's "
                   "diffusion.test_time_views, so both learned models are scored alike)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-dice", action="store_true", help="skip the structure-model segmentation Dice")
    p.add_argument("--title", default=None)
    return p


def _load_baselines(args, cfg, train_cases: list[Case], unet_views: int) -> list[Method]:
    """The two baselines from ``--baselines`` (default ``OUT/baselines``), fitted/trained on ``train_cases`` and
    saved there when absent. The U-Net takes the checkpoint's structure-encoder widths and preprocessing, and is
    scored with ``unet_views`` test-time views."""
    from dataclasses import asdict, replace

    from model.baselines import NearestModalityBaseline, RegressionUNetBaseline, RegressionUNetConfig
    from model.slices import test_time_views

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
    unet = replace(unet, views=tuple(test_time_views(unet_views, cfg.autoencoder.downsample_factor // 2)))
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
    from model.checkpoint import checkpoint_version
    from model.config import read_config

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
    unet_views = cfg.diffusion.test_time_views if args.baseline_views is None else args.baseline_views
    if not args.no_baselines:
        methods += _load_baselines(args, cfg, [c for c in train_pool if all(m in c.images for m in modalities)],
                                   unet_views)
    segmenter = None
    if not args.no_dice and cfg.structure.segmentation and any(c.seg is not None for c in eval_cases):
        segmenter = synth
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ceilings: list[dict] = []
    autoencoded: list[dict] = []
    results = evaluate_cases(
        eval_cases, methods, modalities, cfg.preprocess, steps=args.steps, seed=args.seed,
        counts=_parse_counts(args.available), max_subsets=args.max_subsets, targets=targets,
        max_slices=args.max_slices, segmenter=segmenter, figures_dir=out / "figures", ceilings=ceilings,
        autoencoder=synth, autoencoded=autoencoded)
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
        "seg_predicted_cases": [c.id for c in eval_cases if c.seg is not None and c.seg_is_prediction],
        "steps": args.steps if args.steps is not None else cfg.diffusion.default_steps,
        "test_time_views": {"msgldm": cfg.diffusion.test_time_views,
                            "unet": None if args.no_baselines else unet_views},
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
        "autoencoder_ceiling": summarize([{**c, "method": "autoencoder", "n_available": 0}
                                          for c in autoencoded]).get("autoencoder", {}),
        "figures": figures,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=json_default))
    (out / "report.md").write_text(markdown_report(report))
    return report


def _safe(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the version string is informative only
        return f"unknown ({exc})"


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
