"""The two baselines every quality report includes (spec ``evaluation.md``), with the synthesizer's contract.

Both expose ``synthesize(study, targets) -> dict[str, Volume]``: the available modalities' volumes in, one
volume per target out, on the reference input's grid, in [0, 1] (the model's normalisation), 0 outside the
brain mask, exactly like ``model.pipeline.Synthesizer``, so the evaluation treats all three the same way.

1. :class:`NearestModalityBaseline` (no learning beyond statistics): copy the available modality that
   correlates best with the target on the training cases, histogram-matched inside the brain mask to the
   target's training histogram. The no-model floor.
2. :class:`RegressionUNet` / :class:`RegressionUNetBaseline`: the project's structure encoders (with HFIB) and
   MMSF fusion from ``model.structure``, a U-Net decoder with skips, trained with L1 only (no diffusion, no
   adversary): the classic many-to-one synthesis baseline (MM-GAN without the discriminator).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.data import Case, load_case
from model.io.volume import Volume
from model.metrics import normalize_in_mask
from model.slices import view_back, view_forward
from model.structure import MMSF, SegmentationDecoder, StructureEncoder

log = logging.getLogger(__name__)

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 1001)


class BaselineError(ValueError):
    """A baseline that cannot be fitted, loaded or run on the given inputs (names the file or modality)."""


def brain_mask(volumes: Sequence[Volume] | Sequence[np.ndarray], threshold: float = 0.0) -> np.ndarray:
    """Union of ``value > threshold`` over co-registered volumes (the model's brain-mask rule)."""
    arrays = [np.asarray(v.data if isinstance(v, Volume) else v) for v in volumes]
    if not arrays:
        raise BaselineError("a brain mask needs at least one volume")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise BaselineError(f"volumes of one study must share a grid, got shapes {sorted(shapes)}")
    return np.logical_or.reduce([a > threshold for a in arrays])


def _check_grid(study: dict[str, Volume]) -> Volume:
    ref = next(iter(study.values()))
    for name, v in study.items():
        if v.shape != ref.shape or not np.allclose(v.affine, ref.affine, atol=1e-3):
            raise BaselineError(f"input {name} is not on the grid of the others ({v.shape} vs {ref.shape}): "
                                "co-register the study first")
    return ref


def _empirical_cdf(values: np.ndarray) -> np.ndarray:
    """Mid-rank CDF value of every element (ties share one value), in (0, 1)."""
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return ((below + 0.5 * counts) / values.size)[inverse]


def histogram_match(source: np.ndarray, target_quantiles: np.ndarray,
                    levels: np.ndarray = QUANTILE_LEVELS) -> np.ndarray:
    """Map ``source`` values so their distribution follows the quantile function ``target_quantiles`` at
    ``levels``: each value goes to the target quantile of its own empirical CDF (monotone, ties kept)."""
    source = np.asarray(source, dtype=np.float64)
    if source.size == 0:
        return source.copy()
    return np.interp(_empirical_cdf(source.ravel()), levels, target_quantiles).reshape(source.shape)


# ================================================================================= 1. nearest modality


@dataclass
class NearestModalityBaseline:
    """Copy the best-correlated available modality, histogram-matched to the target.

    ``correlation[i][j]``: mean over training cases of the Pearson correlation of modalities i and j over brain
    voxels, both in the model's [0, 1] normalisation. ``quantiles[m]``: modality m's quantile function inside the
    brain (averaged over training cases) at :data:`QUANTILE_LEVELS`.
    """

    modalities: tuple[str, ...]
    correlation: np.ndarray
    quantiles: np.ndarray
    percentiles: tuple[float, float] = (0.5, 99.5)
    train_cases: list[str] = field(default_factory=list)

    kind = "nearest-modality"

    # ------------------------------------------------------------------ fit / save / load

    @classmethod
    def fit(cls, cases: Sequence[Case], modalities: Sequence[str],
            percentiles: tuple[float, float] = (0.5, 99.5)) -> NearestModalityBaseline:
        """Statistics from training cases (each must have all ``modalities`` on one grid)."""
        mods = tuple(modalities)
        m = len(mods)
        corr_sum, corr_n = np.zeros((m, m)), np.zeros((m, m))
        q_sum, q_n = np.zeros((m, QUANTILE_LEVELS.size)), np.zeros(m)
        for case in cases:
            images, _ = load_case(case)
            present = [k for k in mods if k in images]
            if not present:
                continue
            try:
                mask = brain_mask([images[k] for k in present])
            except BaselineError as exc:
                raise BaselineError(f"case {case.id}: {exc}") from exc
            norm = {k: normalize_in_mask(images[k].data, mask, percentiles)[mask] for k in present}
            for k in present:
                i = mods.index(k)
                q_sum[i] += np.quantile(norm[k], QUANTILE_LEVELS)
                q_n[i] += 1
            for a, b in combinations(present, 2):
                if norm[a].std() > 0 and norm[b].std() > 0:
                    r = float(np.corrcoef(norm[a], norm[b])[0, 1])
                    i, j = mods.index(a), mods.index(b)
                    corr_sum[i, j] += r
                    corr_sum[j, i] += r
                    corr_n[i, j] += 1
                    corr_n[j, i] += 1
        if not q_n.all():
            missing = [k for k, n in zip(mods, q_n, strict=True) if n == 0]
            raise BaselineError(f"no training case has modality {missing}: cannot fit the nearest-modality baseline")
        with np.errstate(invalid="ignore"):
            corr = np.where(corr_n > 0, corr_sum / np.maximum(corr_n, 1), np.nan)
        np.fill_diagonal(corr, 1.0)
        return cls(mods, corr, q_sum / q_n[:, None], tuple(percentiles), [c.id for c in cases])

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        record = {"kind": self.kind, "modalities": list(self.modalities),
                  "correlation": np.nan_to_num(self.correlation, nan=-2.0).tolist(),
                  "quantile_levels": QUANTILE_LEVELS.tolist(), "quantiles": self.quantiles.tolist(),
                  "percentiles": list(self.percentiles), "train_cases": self.train_cases}
        (out / "baseline.json").write_text(json.dumps(record))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> NearestModalityBaseline:
        path = Path(directory) / "baseline.json"
        if not path.is_file():
            raise BaselineError(f"no nearest-modality baseline at {path}")
        rec = json.loads(path.read_text())
        if rec.get("kind") != cls.kind:
            raise BaselineError(f"{path} holds a {rec.get('kind')!r} baseline, not {cls.kind!r}")
        corr = np.asarray(rec["correlation"], dtype=np.float64)
        corr[corr == -2.0] = np.nan
        return cls(tuple(rec["modalities"]), corr, np.asarray(rec["quantiles"]), tuple(rec["percentiles"]),
                   list(rec["train_cases"]))

    # ------------------------------------------------------------------ inference

    def source_for(self, target: str, available: Sequence[str]) -> str:
        """The available modality with the highest training correlation to ``target``."""
        if target not in self.modalities:
            raise BaselineError(f"target {target!r} is not one of {self.modalities}")
        usable = [a for a in available if a in self.modalities and a != target]
        if not usable:
            raise BaselineError(f"no available modality to copy for {target!r} (given {list(available)})")
        t = self.modalities.index(target)
        score = [np.nan_to_num(self.correlation[t, self.modalities.index(a)], nan=-1.0) for a in usable]
        return usable[int(np.argmax(score))]

    def synthesize(self, study: dict[str, Volume], targets: Sequence[str]) -> dict[str, Volume]:
        """Targets on the reference (first input's) grid, in [0, 1], 0 outside the available inputs' brain mask."""
        ref = _check_grid(study)
        mask = brain_mask(list(study.values()))
        out = {}
        for target in targets:
            src = self.source_for(target, list(study))
            x = normalize_in_mask(study[src].data, mask, self.percentiles)
            y = np.zeros_like(x, dtype=np.float32)
            y[mask] = histogram_match(x[mask], self.quantiles[self.modalities.index(target)])
            out[target] = Volume(y, ref.affine, {"synthesized_by": self.kind, "source_modality": src})
        return out


# ================================================================================= 2. regression U-Net


@dataclass(frozen=True)
class RegressionUNetConfig:
    """Architecture and training settings of the regression U-Net baseline (saved as its ``config.json``)."""

    modalities: tuple[str, ...] = ("t1", "t2", "t1ce", "flair")
    channels: tuple[int, ...] = (8, 16, 32, 64)  # structure-encoder widths per scale (tiny preset)
    hfib: bool = True
    hfib_fusion: str = "concat"
    dropout: float = 0.0
    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-3
    train_crop: int | None = 96  # random square crops for training (fully convolutional: infers on whole slices)
    lr_schedule: str = "constant"  # or "cosine" (100 warm-up steps, then cosine to 0: MSG-LDM's cpu recipe)
    bf16: bool = False  # bf16 autocast on the CPU (MSG-LDM's cpu recipe trains so too)
    seed: int = 0
    preprocess: dict = field(default_factory=dict)  # the MSG-LDM model's PreprocessConfig fields

    def __post_init__(self) -> None:
        if len(self.modalities) < 2:
            raise BaselineError(f"the regression U-Net needs >= 2 modalities, got {self.modalities}")
        if self.steps < 0 or self.batch_size < 1:
            raise BaselineError(f"steps={self.steps} must be >= 0 and batch_size={self.batch_size} >= 1")
        down = 2 ** (len(self.channels) - 1)
        if self.train_crop is not None and (self.train_crop < down or self.train_crop % down):
            raise BaselineError(f"train_crop={self.train_crop} must be a positive multiple of {down}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise BaselineError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")


class RegressionUNet(nn.Module):
    """``x (B, M, H, W)`` in [-1, 1] + ``available (B, M)`` -> all modalities ``(B, M, H, W)`` in [-1, 1].

    1. encode each modality with its ``StructureEncoder`` (HFIB at every scale); 2. zero the missing ones'
    inputs and features; 3. fuse per scale with ``MMSF``; 4. decode with skips from the fused features (the
    U-Net decoder of ``model.structure``, M output channels); 5. tanh.
    """

    def __init__(self, cfg: RegressionUNetConfig) -> None:
        super().__init__()
        ch = tuple(cfg.channels)
        self.m = len(cfg.modalities)
        self.encoders = nn.ModuleList(StructureEncoder(1, ch, cfg.hfib, cfg.hfib_fusion, 1.0, cfg.dropout)
                                      for _ in range(self.m))
        self.mmsf = nn.ModuleList(MMSF(self.m, c) for c in ch)
        self.decoder = SegmentationDecoder(ch, classes=self.m)

    def forward(self, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        avail = available.to(dtype=x.dtype)[:, :, None, None, None]  # (B, M, 1, 1, 1)
        per_mod = []
        for j, enc in enumerate(self.encoders):
            feats = enc(x[:, j : j + 1] * avail[:, j])
            per_mod.append([f * avail[:, j] for f in feats])
        fused = [mmsf([feats[level] for feats in per_mod])[0] for level, mmsf in enumerate(self.mmsf)]
        return torch.tanh(self.decoder(fused))


def training_slices(cases: Sequence[Case], modalities: Sequence[str], preprocess_cfg=None,
                    min_brain_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's training slices of ``cases``: ``x (N, M, H, W)`` in [-1, 1] and brain masks ``(N, H, W)``,
    through ``model.preprocess.prepare_study`` (the same slices the MSG-LDM model trains on)."""
    from model.config import PreprocessConfig
    from model.preprocess import prepare_study

    cfg = preprocess_cfg if preprocess_cfg is not None else PreprocessConfig()
    frac = cfg.min_brain_fraction if min_brain_fraction is None else min_brain_fraction
    xs, masks = [], []
    for case in cases:
        images, _ = load_case(case)
        missing = [m for m in modalities if m not in images]
        if missing:
            raise BaselineError(f"training case {case.id} lacks {missing}: the baseline trains on complete cases")
        prep = prepare_study({m: images[m] for m in modalities}, list(modalities), cfg)
        x = np.asarray(prep.x, dtype=np.float32)
        mask = np.asarray(prep.mask, dtype=bool)
        keep = mask.reshape(mask.shape[0], -1).mean(1) > frac
        xs.append(x[keep])
        masks.append(mask[keep])
    if not xs or sum(len(x) for x in xs) == 0:
        raise BaselineError("no training slices with brain in the given cases")
    return np.concatenate(xs), np.concatenate(masks)


def train_regression_unet(x: np.ndarray, cfg: RegressionUNetConfig,
                          on_step: Callable[[int, float], None] | None = None, threads: int | None = 1):
    """Train with L1 on the missing modalities only; deterministic for ``cfg.seed`` (single thread, CPU).

    Per sample the number of available modalities is uniform in 1..M-1 and the subset random (the MSG-LDM
    masking, leaving at least one target); with ``cfg.train_crop`` each sample is a random square crop (4x cheaper
    at 96 of 192; the network is fully convolutional). ``x``: ``(N, M, H, W)`` in [-1, 1]. Runs on ``threads``
    CPU threads (default 1; None keeps torch's setting). Returns the network in eval mode.
    """
    if x.ndim != 4 or x.shape[1] != len(cfg.modalities):
        raise BaselineError(f"training slices must be (N, {len(cfg.modalities)}, H, W), got {x.shape}")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(x, cfg, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _train(x: np.ndarray, cfg: RegressionUNetConfig, on_step: Callable[[int, float], None] | None):
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = RegressionUNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    m = len(cfg.modalities)
    net.train()
    for step in range(cfg.steps):
        idx = rng.integers(0, len(data), size=cfg.batch_size)
        avail = np.zeros((cfg.batch_size, m), dtype=bool)
        for b in range(cfg.batch_size):
            k = rng.integers(1, m)  # 1..M-1 available
            avail[b, rng.choice(m, size=k, replace=False)] = True
        batch = data[idx]
        crop = cfg.train_crop
        if crop is not None and crop < min(batch.shape[-2:]):
            ys = rng.integers(0, batch.shape[-2] - crop + 1, size=cfg.batch_size)
            xs = rng.integers(0, batch.shape[-1] - crop + 1, size=cfg.batch_size)
            batch = torch.stack([b[:, y : y + crop, x : x + crop] for b, y, x in zip(batch, ys, xs, strict=True)])
        a = torch.from_numpy(avail)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = net(batch, a).float()
        missing = (~a).to(batch.dtype)[:, :, None, None]
        loss = ((pred - batch).abs() * missing).sum() / (missing.sum() * batch.shape[-1] * batch.shape[-2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step, loss.item())
    net.eval()
    return net


def _lr_factor(step: int, cfg: RegressionUNetConfig, warmup: int = 100) -> float:
    if cfg.lr_schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(cfg.steps - warmup, 1)))


def step_flops(cfg: RegressionUNetConfig, size: int | None = None) -> float:
    """Forward + backward FLOPs of one training step (conv/matmul, ``torch.utils.flop_counter``) at the config's
    batch and crop (or ``size``)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = size or cfg.train_crop or 192
    net = RegressionUNet(cfg)
    x = torch.zeros(cfg.batch_size, len(cfg.modalities), size, size)
    avail = torch.zeros(cfg.batch_size, len(cfg.modalities), dtype=torch.bool)
    avail[:, 0] = True
    with FlopCounterMode(display=False) as counter:
        net(x, avail).abs().mean().backward()
    return float(counter.get_total_flops())


@dataclass
class RegressionUNetBaseline:
    """A trained regression U-Net with its config; ``synthesize`` runs it through the model's preprocessing,
    averaging its prediction over ``views`` (``model.slices.test_time_views``: set by the evaluation to MSG-LDM's, so
    both learned models are scored with the same test-time views; default the slices alone)."""

    cfg: RegressionUNetConfig
    net: object
    record: dict = field(default_factory=dict)
    views: tuple[tuple[bool, int], ...] = ((False, 0),)

    kind = "regression-unet"

    @classmethod
    def train(cls, cases: Sequence[Case], cfg: RegressionUNetConfig, log_every: int = 50,
              threads: int | None = 1) -> RegressionUNetBaseline:
        from model.config import PreprocessConfig

        pcfg = PreprocessConfig(**_tuples(cfg.preprocess)) if cfg.preprocess else PreprocessConfig()
        if not cfg.preprocess:
            cfg = RegressionUNetConfig(**{**asdict(cfg), "preprocess": asdict(pcfg)})
        x, _ = training_slices(cases, cfg.modalities, pcfg)
        losses: list[float] = []

        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            if log_every and (step + 1) % log_every == 0:
                log.info("regression-unet step %d/%d L1 %.4f", step + 1, cfg.steps, np.mean(losses[-log_every:]))

        t0 = time.perf_counter()
        net = train_regression_unet(x, cfg, on_step, threads=threads)
        record = {"train_cases": [c.id for c in cases], "slices": int(len(x)), "steps": cfg.steps,
                  "seconds": round(time.perf_counter() - t0, 1),
                  "final_l1": float(np.mean(losses[-20:])) if losses else None}
        return cls(cfg, net, record)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"kind": self.kind, **asdict(self.cfg), "record": self.record},
                                                    indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(out / "weights.safetensors"))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> RegressionUNetBaseline:
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "config.json").is_file() or not (d / "weights.safetensors").is_file():
            raise BaselineError(f"{d} is not a regression U-Net directory (needs config.json and weights.safetensors)")
        rec = json.loads((d / "config.json").read_text())
        if rec.pop("kind", None) != cls.kind:
            raise BaselineError(f"{d / 'config.json'} is not a {cls.kind} config")
        record = rec.pop("record", {})
        cfg = RegressionUNetConfig(**_tuples(rec))
        net = RegressionUNet(cfg)
        net.load_state_dict(load_file(str(d / "weights.safetensors")))
        net.eval()
        return cls(cfg, net, record)

    def predict_slices(self, x: np.ndarray, available: Sequence[bool], chunk: int = 16) -> np.ndarray:
        """``x (S, M, H, W)`` in [-1, 1] with the missing channels' values ignored -> ``(S, M, H, W)`` predictions."""
        avail = torch.as_tensor(np.asarray(available, dtype=bool))[None]
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), chunk):
                xb = torch.from_numpy(np.ascontiguousarray(x[i : i + chunk], dtype=np.float32))
                outs.append(self.net(xb, avail.expand(len(xb), -1)).numpy())
        return np.concatenate(outs) if outs else np.zeros_like(x)

    def synthesize(self, study: dict[str, Volume], targets: Sequence[str]) -> dict[str, Volume]:
        """Targets on the reference grid in [0, 1] via ``prepare_study`` -> network -> ``restore_volume``."""
        from model.config import PreprocessConfig
        from model.preprocess import prepare_study, restore_volume

        mods = self.cfg.modalities
        bad = [t for t in targets if t not in mods] + [a for a in study if a not in mods]
        if bad:
            raise BaselineError(f"modalities {bad} are not among the baseline's {mods}")
        pcfg = PreprocessConfig(**_tuples(self.cfg.preprocess)) if self.cfg.preprocess else PreprocessConfig()
        prep = prepare_study(study, list(mods), pcfg)
        x = np.asarray(prep.x, dtype=np.float32)
        available = [m in study for m in mods]
        pred = np.zeros_like(x)
        for view in self.views:
            seen = view_forward(torch.from_numpy(x), view).numpy()
            pred += view_back(torch.from_numpy(self.predict_slices(seen, available)), view).numpy() / len(self.views)
        out = {}
        for t in targets:
            vol = restore_volume(pred[:, mods.index(t)], prep)
            out[t] = Volume(np.asarray(vol.data, dtype=np.float32), vol.affine, {"synthesized_by": self.kind})
        return out


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# ================================================================================= CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Fit both baselines on an MSG-LDM checkpoint's (or training run's) recorded train split, the U-Net to a FLOP
    budget, so that model.evaluate compares like with like (``--baselines DIR``)."""
    p = argparse.ArgumentParser(prog="python -m model.baselines", description=main.__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="MSG-LDM checkpoint or run folder: its config.json gives the "
                   "structure widths and preprocessing, its split.json / metrics.json the training cases")
    p.add_argument("--data", required=True, nargs="+", help="dataset folder(s) holding the split's cases")
    p.add_argument("--out", required=True, help="folder for nearest/ and unet/")
    p.add_argument("--budget-tflop", type=float, default=None, help="U-Net training FLOPs (forward + backward); "
                   "sets the steps from the measured FLOPs of one step")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cosine", action="store_true", help="warm-up + cosine learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from model.config import read_config
    from model.data import find_cases

    ckpt = Path(args.checkpoint)
    cfg = read_config(ckpt)
    split_file = ckpt / "split.json"
    split = json.loads(split_file.read_text()) if split_file.is_file() else json.loads(
        (ckpt / "metrics.json").read_text()).get("split", {})
    if not split.get("train"):
        raise SystemExit(f"{ckpt} records no training split (split.json or metrics.json 'split')")
    by_id = {c.id: c for c in find_cases(args.data)}
    missing = [c for c in split["train"] if c not in by_id]
    if missing:
        raise SystemExit(f"training cases {missing} are not under {args.data}")
    train = [by_id[c] for c in split["train"]]
    out = Path(args.out)
    NearestModalityBaseline.fit(train, cfg.modalities, tuple(cfg.preprocess.clip_percentiles)).save(out / "nearest")
    ucfg = RegressionUNetConfig(modalities=tuple(cfg.modalities), channels=tuple(cfg.structure.channels),
                                steps=args.steps, batch_size=args.batch_size, lr=args.lr, train_crop=args.crop,
                                lr_schedule="cosine" if args.cosine else "constant", bf16=args.bf16, seed=args.seed,
                                preprocess=asdict(cfg.preprocess))
    flops = step_flops(ucfg)
    if args.budget_tflop:
        ucfg = RegressionUNetConfig(**{**asdict(ucfg), "steps": max(1, round(args.budget_tflop * 1e12 / flops))})
    log.info("regression U-Net: %d steps x %.1f GFLOP = %.0f TFLOP on %d cases", ucfg.steps, flops / 1e9,
             ucfg.steps * flops / 1e12, len(train))
    unet = RegressionUNetBaseline.train(train, ucfg, threads=args.threads)
    unet.record.update(step_gflop=round(flops / 1e9, 2), train_tflop=round(ucfg.steps * flops / 1e12, 1),
                       threads=args.threads)
    unet.save(out / "unet")
    log.info("baselines written to %s (U-Net %.0f s)", out, unet.record["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
