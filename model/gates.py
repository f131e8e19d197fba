"""Gates between the training stages (docs/model.md "Gates"): checks on the validation slices that a stage is
good enough to build the next one on. ``python -m model.train`` computes each after its stage, logs it, writes it
to ``metrics.json`` and stops the run when one fails (``--ignore-gates`` goes on).

1. stage 0: the autoencoder's reconstruction, brain PSNR >= ``train.gate_stage0_psnr`` (28 dB);
2. stage 1: D_rec's reconstruction of each modality from the other three beats the nearest-modality baseline
   (best-correlated available modality, histogram-matched to the target) in brain PSNR, on the mean over targets;
3. stage 2: the output depends on the inputs (PSNR spread across input subsets > ``gate_stage2_spread``) and on
   z_t (the z0 estimate at t = T-1 on the missing channels errs at most ``gate_stage2_ratio`` x the mean latent's).

PSNRs are in [0, 1] over the brain of each slice (any present modality above background).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from model.baselines import QUANTILE_LEVELS, histogram_match
from model.msgldm import MSGLDM
from model.slices import SliceDataset


@dataclass(frozen=True)
class Gate:
    stage: int
    name: str
    value: float
    threshold: float
    passed: bool
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return f"gate {self.name} (stage {self.stage}) {verdict}: {self.value:.3f} vs threshold {self.threshold:.3f}"


def _indices(ds: SliceDataset, n: int) -> torch.Tensor:
    return torch.linspace(0, len(ds) - 1, min(n, len(ds))).long()


def _brain(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` brain mask: above background (-1) in any modality of ``x (B, M, H, W)``."""
    return (x > -1 + 1e-3).any(1)


def _psnr(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over slices of the brain PSNR in [0, 1] (images in [-1, 1])."""
    out = []
    for p, t, m in zip(pred, truth, mask, strict=True):
        if m.any():
            mse = (((p.float().clamp(-1, 1) - t.float()) / 2)[m] ** 2).mean().item()
            out.append(10 * math.log10(1.0 / max(mse, 1e-10)))
    return float(np.mean(out)) if out else float("nan")


@torch.no_grad()
def stage0(model: MSGLDM, val: SliceDataset, threshold: float, n: int = 48) -> Gate:
    x = val.x[_indices(val, n)].float()
    mask = _brain(x)
    psnrs = []
    for j in range(x.shape[1]):
        z, _ = model.autoencoder.encode(x[:, j : j + 1])
        psnrs.append(_psnr(model.autoencoder.decode(z)[:, 0], x[:, j], mask))
    value = float(np.mean(psnrs))
    per = dict(zip(model.modalities, (round(p, 3) for p in psnrs), strict=True))
    detail = {"per_modality": per, "slices": len(x)}
    return Gate(0, "autoencoder_brain_psnr", value, threshold, value >= threshold, detail)


class SliceNearest:
    """The nearest-modality baseline on slices in [-1, 1]: correlations and target quantiles over the brain of
    the training slices, the source histogram-matched per slice (the volume baseline, ``model.baselines``,
    matches per volume)."""

    def __init__(self, train: SliceDataset, n: int = 256) -> None:
        x = (train.x[_indices(train, n)].float() + 1) / 2
        mask = _brain(x * 2 - 1)
        vals = x.permute(1, 0, 2, 3)[:, mask]  # (M, voxels)
        self.corr = np.corrcoef(vals.numpy())
        self.quantiles = np.stack([np.quantile(v.numpy(), QUANTILE_LEVELS) for v in vals])

    def source(self, target: int, available: list[int]) -> int:
        return max((a for a in available if a != target), key=lambda a: self.corr[target, a])

    def predict(self, x: torch.Tensor, target: int, available: list[int]) -> torch.Tensor:
        """``x (B, M, H, W)`` -> the target ``(B, H, W)`` in [-1, 1]."""
        src = self.source(target, available)
        mask = _brain(x[:, available])
        out = torch.full_like(x[:, target], -1.0)
        for i in range(len(x)):
            v = ((x[i, src][mask[i]] + 1) / 2).numpy()
            out[i][mask[i]] = torch.from_numpy(histogram_match(v, self.quantiles[target]) * 2 - 1).float()
        return out


@torch.no_grad()
def stage1(model: MSGLDM, train: SliceDataset, val: SliceDataset, n: int = 32) -> Gate:
    x = val.x[_indices(val, n)].float()
    mask = _brain(x)
    nearest = SliceNearest(train)
    m = x.shape[1]
    detail: dict = {}
    margins = []
    for j, name in enumerate(model.modalities):
        others = [k for k in range(m) if k != j]
        available = torch.zeros(len(x), m, dtype=torch.bool)
        available[:, others] = True
        rec = model.structure(x, available)["recon"][:, j]
        p_model = _psnr(rec, x[:, j], mask)
        p_base = _psnr(nearest.predict(x, j, others), x[:, j], mask)
        margins.append(p_model - p_base)
        detail[name] = {"d_rec_psnr": round(p_model, 3), "nearest_psnr": round(p_base, 3)}
    all4 = model.structure(x, torch.ones(len(x), m, dtype=torch.bool))["recon"]
    detail["all_inputs_psnr"] = round(float(np.mean([_psnr(all4[:, j], x[:, j], mask) for j in range(m)])), 3)
    value = float(np.mean(margins))
    return Gate(1, "d_rec_minus_nearest_psnr", value, 0.0, value > 0.0, detail)


def _z0_estimate(model: MSGLDM, out: torch.Tensor, z_t: torch.Tensor, t: int) -> torch.Tensor:
    eps = model.scheduler.to_eps(out.float(), t, z_t)
    a = float(model.scheduler.alphas_cumprod[t])
    return (z_t - (1 - a) ** 0.5 * eps) / a**0.5


@torch.no_grad()
def stage2(
    model: MSGLDM,
    val: SliceDataset,
    z_mean: torch.Tensor,
    spread_threshold: float,
    ratio_threshold: float,
    n: int = 8,
    steps: int | None = None,
) -> Gate:
    """``z_mean (4M, h, w)``: the mean training latent (scaled)."""
    x = val.x[_indices(val, n)].float()
    mask = _brain(x)
    m, k = x.shape[1], model.z_per_modality
    z0 = model.encode_latents(x)
    t = model.scheduler.num_train_timesteps - 1
    gen = torch.Generator().manual_seed(0)
    detail: dict = {}
    ratios, spreads = [], []
    for j, name in enumerate(model.modalities):
        others = [i for i in range(m) if i != j]
        available = torch.zeros(len(x), m, dtype=torch.bool)
        available[:, others] = True
        eps = torch.randn(z0.shape, generator=gen)
        z_t = model.scheduler.add_noise(z0, eps, torch.full((len(x),), t))
        cond = model.unet_condition(model.condition(x, available), z0, available)
        out = model.unet(z_t, torch.full((len(x),), t), cond)
        ch = slice(j * k, (j + 1) * k)
        err = (_z0_estimate(model, out, z_t, t)[:, ch] - z0[:, ch]).pow(2).mean().item()
        base = (z_mean[None, ch] - z0[:, ch]).pow(2).mean().item()
        ratios.append(err / max(base, 1e-12))
        psnrs = {}
        for subset in [[o] for o in others] + [others]:
            avail = torch.zeros(len(x), m, dtype=torch.bool)
            avail[:, subset] = True
            pred = model.sample(x, avail, steps, seed=0, targets=[j])[:, 0]
            psnrs["+".join(model.modalities[s] for s in subset)] = round(_psnr(pred, x[:, j], mask), 3)
        spreads.append(max(psnrs.values()) - min(psnrs.values()))
        detail[name] = {"z0_error_t_max": round(err, 5), "mean_latent_error": round(base, 5), "psnr_by_inputs": psnrs}
    ratio, spread = float(np.mean(ratios)), float(np.mean(spreads))
    detail.update(z0_error_ratio=round(ratio, 4), psnr_spread=round(spread, 3), ratio_threshold=ratio_threshold)
    passed = spread > spread_threshold and ratio <= ratio_threshold
    return Gate(2, "input_dependence_psnr_spread", spread, spread_threshold, passed, detail)


@torch.no_grad()
def sampler_table(
    model: MSGLDM,
    val: SliceDataset,
    settings: list[tuple[int, float, int]],
    n: int = 16,
    replace_known: bool | None = None,
) -> list[dict]:
    """Quality against the sampler's settings on the validation slices: for each ``(steps, eta, samples)``, brain
    PSNR and SSIM (in [0, 1], Gaussian 11/1.5) of every target from the other three, the output being the mean of
    ``samples`` samples (seeds 0, 1, ...) as the pipeline averages them, mean over targets, and seconds per slice.
    ``replace_known``: the sampler's inpainting-style replacement of the known latents (None: the config's).
    The default sampler is chosen from this table (docs/model.md)."""
    import time

    from model.losses import ssim

    x = val.x[_indices(val, n)].float()
    mask = _brain(x)
    m = x.shape[1]
    rows = []
    for steps, eta, samples in settings:
        psnrs, ssims, t0 = [], [], time.perf_counter()
        for j in range(m):
            available = torch.ones(len(x), m, dtype=torch.bool)
            available[:, j] = False
            pred = sum(
                model.sample(x, available, steps, seed=k, eta=eta, replace_known=replace_known, targets=[j])[:, 0]
                .float()
                for k in range(samples)
            )
            pred = pred / samples
            psnrs.append(_psnr(pred, x[:, j], mask))
            p01, t01 = (pred.float().clamp(-1, 1)[:, None] + 1) / 2, (x[:, j : j + 1] + 1) / 2
            ssims.append(float(ssim(p01 * mask[:, None], t01 * mask[:, None], 1.0).mean()))
        rows.append({"steps": steps, "eta": eta, "samples": samples, "psnr": round(float(np.mean(psnrs)), 3),
                     "ssim": round(float(np.mean(ssims)), 4),
                     "seconds_per_slice": round((time.perf_counter() - t0) / (m * len(x)), 3),
                     "per_target_psnr": dict(zip(model.modalities, (round(p, 3) for p in psnrs), strict=True))})
    return rows


def _setting(item: str) -> tuple[int, float, int]:
    """``steps:eta[:samples]`` -> ``(steps, eta, samples)``."""
    parts = item.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--sampler: {item!r} is not steps:eta[:samples]")
    return int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 1


def main(argv: list[str] | None = None) -> int:
    """Recompute the gates of a checkpoint on its recorded validation split, and the sampler table."""
    import argparse
    import json
    from pathlib import Path

    from model.checkpoint import load_checkpoint
    from model.data import find_cases

    p = argparse.ArgumentParser(prog="python -m model.gates", description=main.__doc__)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, nargs="+")
    p.add_argument("--sampler", default="1:0,5:0,10:0,25:0,10:1,5:0:4,10:0:4",
                   help="steps:eta[:samples] settings of the sampler table (empty: none; samples default 1)")
    p.add_argument("--train-slices", type=int, default=256, help="training slices for the baselines' statistics "
                   "and the mean latent")
    p.add_argument("--sampler-only", action="store_true", help="only the sampler table (the gates are in the "
                   "checkpoint's metrics.json already)")
    p.add_argument("--slices", type=int, default=16, help="validation slices of the sampler table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--replace-known", choices=["on", "off"], default=None,
                   help="the sampler table with diffusion.replace_known on or off (default: the checkpoint's)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the result (default: print only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    split = json.loads((args.checkpoint / "metrics.json").read_text()).get("split") or {}
    if not split.get("val"):
        raise SystemExit(f"{args.checkpoint} records no validation split")
    by_id = {c.id: c for c in find_cases(args.data)}
    val = SliceDataset([by_id[c] for c in split["val"]], cfg)
    use_bf16 = cfg.train.cpu_bf16 and torch.backends.mkldnn.is_available()
    gates: list[Gate] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        if not args.sampler_only:
            train = SliceDataset([by_id[c] for c in split["train"]], cfg)
            train.x = train.x[_indices(train, args.train_slices)]
            z_mean = torch.cat(
                [model.encode_latents(train.x[i : i + 32].float()).float() for i in range(0, len(train.x), 32)]
            ).mean(0)
            gates = [stage0(model, val, cfg.train.gate_stage0_psnr), stage1(model, train, val),
                     stage2(model, val, z_mean, cfg.train.gate_stage2_spread, cfg.train.gate_stage2_ratio)]
        settings = [_setting(item) for item in args.sampler.split(",") if item]
        replace = None if args.replace_known is None else args.replace_known == "on"
        table = sampler_table(model, val, settings, n=args.slices, replace_known=replace) if settings else []
    result = {"checkpoint": str(args.checkpoint), "val": split["val"],
              "gates": {f"stage{g.stage}": g.to_dict() for g in gates}, "sampler": table}
    for g in gates:
        print(g.message())
    for row in table:
        print(f"steps {row['steps']:>3} eta {row['eta']:.1f} samples {row['samples']}: PSNR {row['psnr']:.2f} dB, "
              f"SSIM {row['ssim']:.4f}, "
              f"{row['seconds_per_slice']:.3f} s/slice")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
