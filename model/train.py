"""Train MSG-LDM in three stages (authors' order): 0 autoencoder, 1 structure model, 2 latent diffusion.

    python -m model.train --preset tiny --stage all --data ../shared/data/brats2023_gli_00001_000 \
        ../shared/data/tcga_du_7294_preprocessed --out runs/tiny --max-steps 600,300,1200 --threads 1

Resumable: each stage keeps ``OUT/stage{k}.pt`` (weights, optimiser, step; every ``ckpt_every`` steps and at the
end); rerunning the same command continues where it stopped. Logs: ``OUT/log.jsonl`` (one JSON object per log
or validation event), TensorBoard in ``OUT/tb`` when installed. After stage 2 the inference checkpoint is written
to ``OUT/model`` (config.json + safetensors + metrics.json). DDP when launched by torchrun; bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from model.checkpoint import checkpoint_version, load_checkpoint, save_checkpoint
from model.config import MSGLDMConfig, load_preset, read_config
from model.data import find_cases, split_cases
from model.losses import (
    adain_kl,
    adaptive_gan_weight,
    generator_loss,
    hinge_d_loss,
    segmentation_loss,
    ssim,
    structure_aware_loss,
    style_consistency_loss,
)
from model.msgldm import MSGLDM
from model.slices import ModalityMasker, SliceDataset, view_forward

log = logging.getLogger("model.train")
PARTS = ("autoencoder", "structure", "unet")  # the part each stage (0, 1, 2) trains


# ----------------------------------------------------------------------------------------------- helpers


class Run:
    """Process-wide training context: device, DDP rank, logging, and the run's progress file.

    ``OUT/progress.json`` is the trainer's own account of the run, rewritten (atomically) with every log event, for
    whoever follows it (the service's training worker reads it; nothing re-derives the trainer's arithmetic):
    ``{"stages": {"0": {"step", "steps", "finished"}, ...}, "stage": current, "history": [one entry per validation:
    stage, step, epoch, the latest training losses, the validation metrics], "gates": {"stage0": {...}, ...}}``.
    A resumed run continues the file it finds.
    """

    def __init__(self, out: Path, device: torch.device, rank: int, world: int) -> None:
        self.out, self.device, self.rank, self.world = out, device, rank, world
        self.t0 = time.time()
        self.tb = None
        self.progress: dict = {"stages": {}, "stage": None, "history": [], "gates": {}}
        self._losses: dict[int, dict] = {}
        self._per_epoch: dict[int, float] = {}
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError, ValueError):
                self.progress |= json.loads((out / "progress.json").read_text())
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def begin_stage(self, stage: int, steps: int, batch: int, slices: int) -> None:
        """Record a stage's target before it trains (``slices`` per epoch, ``batch`` per process)."""
        self._per_epoch[stage] = slices / max(batch * self.world, 1)
        if not self.is_main:
            return
        entry = self.progress["stages"].setdefault(str(stage), {"step": 0, "finished": False})
        entry["steps"] = steps
        self.progress["stage"] = stage
        self._write_progress()

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time() - self.t0, 2), **record}
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, float | int) and k not in ("stage", "step", "time"):
                    self.tb.add_scalar(f"stage{record['stage']}/{split}/{k}", v, record["step"])
        self._track(record)

    def _track(self, r: dict) -> None:
        stage, split = r["stage"], r.get("split")
        entry = self.progress["stages"].setdefault(str(stage), {"step": 0, "finished": False})
        entry["step"] = max(entry.get("step", 0), int(r.get("step", 0)))
        numbers = {k: v for k, v in r.items() if k not in ("time", "stage", "step", "split") and _number(v)}
        if split == "train":
            self._losses[stage] = numbers
        elif split == "val":
            per_epoch = self._per_epoch.get(stage)
            self.progress["history"].append(
                {
                    "stage": stage,
                    "step": r["step"],
                    "epoch": round(r["step"] / per_epoch, 3) if per_epoch else None,
                    "losses": self._losses.get(stage, {}),
                    "val": numbers,
                }
            )
        elif split == "summary":
            entry["finished"] = True
        elif split == "gate":
            self.progress["gates"][f"stage{stage}"] = {k: v for k, v in r.items() if k not in ("time", "split")}
        self._write_progress()

    def _write_progress(self) -> None:
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps(self.progress, indent=1) + "\n")
        os.replace(tmp, self.out / "progress.json")

    def autocast(self, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA always, on the CPU when ``cpu_bf16`` (``train.cpu_bf16``)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _loader(ds: SliceDataset, batch: int, run: Run, seed: int) -> Iterator[dict]:
    """Endless shuffled batches (DistributedSampler under DDP)."""
    epoch = 0
    while True:
        if run.world > 1:
            sampler = DistributedSampler(ds, num_replicas=run.world, rank=run.rank, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            g = torch.Generator().manual_seed(seed + epoch)
            sampler = RandomSampler(ds, replacement=len(ds) < batch, num_samples=max(len(ds), batch), generator=g)
        yield from DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True)
        epoch += 1


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _psnr01(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in [0, 1] of images in [-1, 1]; over ``mask`` (the brain) when given."""
    err = ((a.float().clamp(-1, 1) - b.float()) / 2).pow(2)
    mse = err[mask.expand_as(err)].mean().item() if mask is not None else err.mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def _brain(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` brain mask of a batch: above background (-1) in any present modality."""
    return ((x > -1 + 1e-3) & present[:, :, None, None]).any(1, keepdim=True)


def lr_factor(step: int, steps: int, train_cfg) -> float:
    """Learning-rate multiplier at ``step`` of ``steps``: linear warm-up, then constant or cosine to 0."""
    if train_cfg.warmup_steps and step < train_cfg.warmup_steps:
        return (step + 1) / train_cfg.warmup_steps
    if train_cfg.lr_schedule == "cosine":
        span = max(steps - train_cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - train_cfg.warmup_steps, span) / span))
    return 1.0


def _dice(prob: torch.Tensor, target: torch.Tensor) -> float:
    p = (prob > 0.5).float()
    inter, total = (p * target).sum().item(), (p.sum() + target.sum()).item()
    return 1.0 if total == 0 else 2 * inter / total


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    return m.module if hasattr(m, "module") else m


class EMA:
    """Exponential moving average of a module's parameters (and copied buffers)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up as in CompVis LitEma
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - d)
        for s, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            s.copy_(b)


# ----------------------------------------------------------------------------------------------- stages


def _stage_path(run: Run, stage: int) -> Path:
    return run.out / f"stage{stage}.pt"


def _load_stage(run: Run, stage: int) -> dict | None:
    p = _stage_path(run, stage)
    # our own resume state (optimizer, RNG), written by this trainer into its run directory; never uploaded data
    return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None  # nosec B614


def _save_stage(run: Run, stage: int, state: dict) -> None:
    if run.is_main:
        tmp = _stage_path(run, stage).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, _stage_path(run, stage))


def _ddp(module: torch.nn.Module, run: Run) -> torch.nn.Module:
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [run.device.index] if run.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
    return module


def _autoencoder_loss(model: MSGLDM, wrapped, wrapped_d, x: torch.Tensor, present: torch.Tensor,
                      gen: torch.Generator, step: int) -> tuple[torch.Tensor, dict, tuple[torch.Tensor, torch.Tensor]]:
    """Stage 0: one present modality per sample through the shared single-channel autoencoder: L1 (+ SSIM), the
    codebook or KL term, and after ``disc_start`` the adaptively weighted GAN term. Also returns (input, output)
    for the discriminator's step."""
    cfg = model.cfg.autoencoder
    device = x.device
    pick = torch.multinomial(present.float().cpu(), 1, generator=gen).squeeze(1).to(device)
    x1 = x[torch.arange(x.shape[0], device=device), pick][:, None]
    x_rec, reg = wrapped(x1)
    rec = F.l1_loss(x_rec.float(), x1)
    if cfg.perceptual == "ssim":
        rec = rec + cfg.perceptual_weight * (1 - ssim(x_rec.float(), x1, 2.0)).mean()
    reg_w = cfg.codebook_weight if cfg.kind == "vq" else cfg.kl_weight
    loss = rec + reg_w * reg.float()
    logs: dict[str, float] = {}
    if step >= cfg.disc_start and cfg.disc_weight > 0:
        g = generator_loss(wrapped_d(x_rec))
        w = adaptive_gan_weight(rec, g, model.autoencoder.last_layer) * cfg.disc_weight
        loss = loss + w * g
        logs.update(g_loss=g.item(), gan_weight=w.item())
    logs.update(rec=rec.item(), reg=reg.item())
    return loss, logs, (x1, x_rec)


def _structure_loss(model: MSGLDM, wrapped, b: dict, masker: ModalityMasker) -> tuple[torch.Tensor, dict]:
    """Stage 1: L_sa per present modality, L_sc, the AdaIN KL and, with labels, L_seg (paper eqs. 6-9)."""
    cfg = model.cfg.structure
    x, present = b["x"], b["present"]
    available = masker(present)
    out = wrapped(x, available)
    recon = out["recon"].float()
    sa = torch.stack(
        [
            structure_aware_loss(recon[present[:, j], j][:, None], x[present[:, j], j][:, None], cfg.sa_dct)
            for j in range(x.shape[1])
            if present[:, j].any()
        ]
    ).mean()
    sc = style_consistency_loss(out["styles"], out["tau"], valid=present)
    kl = adain_kl(out["adain_mu"].float(), out["adain_sigma"].float())
    loss = cfg.sa_weight * sa + cfg.sc_weight * sc + cfg.kl_weight * kl
    logs: dict[str, float] = {}
    if cfg.segmentation and b["has_seg"].any():
        hs = b["has_seg"]
        seg = segmentation_loss(out["seg_logits"][hs], b["seg"][hs], cfg.seg_bce_weight, dice=cfg.seg_dice)
        loss = loss + cfg.seg_weight * seg
        logs["seg"] = seg.item()
    logs.update(sa=sa.item(), sc=sc.item(), kl=kl.item(), tau=out["tau"].item())
    return loss, logs


@dataclass
class _Stage:
    """What one stage trains: the module, its optimiser, and stage 0's discriminator or stage 2's EMA."""

    trainable: torch.nn.Module
    opt: torch.optim.Optimizer
    disc: torch.nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    ema: EMA | None = None

    @classmethod
    def build(cls, stage: int, model: MSGLDM, device: torch.device) -> _Stage:
        cfg = model.cfg
        ae, sm, unet = model.autoencoder, model.structure, model.unet
        if stage == 0:
            from model.autoencoder import PatchDiscriminator

            disc = PatchDiscriminator(cfg.autoencoder.disc_layers, cfg.autoencoder.disc_channels).to(device)
            if cfg.train.stage0_train == "decoder":  # latents unchanged: the diffusion trained on them stays valid
                ae.encoder.requires_grad_(False)
                ae.quant_conv.requires_grad_(False)
            params = [p for p in ae.parameters() if p.requires_grad] if cfg.train.stage0_train == "decoder" else list(
                ae.parameters())
            betas = cfg.autoencoder.betas
            return cls(ae, torch.optim.Adam(params, lr=cfg.autoencoder.lr, betas=betas), disc,
                       torch.optim.Adam(disc.parameters(), lr=cfg.autoencoder.lr, betas=betas))
        if stage == 1:
            return cls(sm, torch.optim.Adam(sm.parameters(), lr=cfg.structure.lr, betas=cfg.structure.betas,
                                            weight_decay=cfg.structure.weight_decay))
        ae.eval().requires_grad_(False)
        sm.eval().requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.diffusion.lr, weight_decay=cfg.diffusion.weight_decay)
        return cls(unet, opt, ema=EMA(unet, cfg.diffusion.ema_decay))

    def resume(self, state: dict) -> None:
        self.trainable.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and self.opt_d is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None and "ema" in state:
            self.ema.shadow.load_state_dict(state["ema"])

    def state(self, wrapped: torch.nn.Module) -> dict:
        st = {"model": _unwrap(wrapped).state_dict(), "opt": self.opt.state_dict()}
        if self.disc is not None and self.opt_d is not None:
            st.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict())
        if self.ema is not None:
            st["ema"] = self.ema.shadow.state_dict()
        return st


def train_stage(
    stage: int, model: MSGLDM, train_ds: SliceDataset, val_ds: SliceDataset, run: Run, steps: int, batch: int, seed: int
) -> dict:
    """Train one stage up to ``steps`` (resuming from ``stage{k}.pt``); return its last validation metrics."""
    cfg = model.cfg
    device = run.device
    state = _load_stage(run, stage)
    parts = _Stage.build(stage, model, device)
    trainable, opt, disc, opt_d, ema = parts.trainable, parts.opt, parts.disc, parts.opt_d, parts.ema
    base_lr = [g["lr"] for g in opt.param_groups]
    step = 0
    last_val: dict = {}
    if state is not None:
        parts.resume(state)
        step = int(state["step"])
        last_val = state.get("val", {})
        log.info("stage %d: resumed at step %d", stage, step)
    if step >= steps:
        return last_val

    trainable.train()
    if disc is not None:
        disc.train()
    wrapped = _ddp(trainable, run)
    wrapped_d = _ddp(disc, run) if disc is not None else None
    bf16 = cfg.train.cpu_bf16
    cache = Stage2Cache.build(model, train_ds, run, seed) if stage == 2 else None
    gen = torch.Generator().manual_seed(seed * 1000 + stage * 100 + step + run.rank)
    masker = ModalityMasker(gen)
    # stage 1 ends on whole slices: F_s of a crop is not the same window of the whole slice's F_s (norms, attention)
    full_from = steps - cfg.train.stage1_full_steps if stage == 1 and cfg.train.stage1_full_steps else steps
    full_batch = cfg.train.stage1_full_batch or batch
    batches = _loader(train_ds, batch if step < full_from else full_batch, run, seed + step)

    def snapshot() -> dict:
        st = {"stage": stage, "step": step, **parts.state(wrapped), "val": last_val, "steps_target": steps}
        if cache is not None:
            st["z_mean"] = cache.z.mean(0)  # for the stage-2 gate
        return st

    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        initial=step,
        desc=f"stage {stage}",
        disable=not run.is_main,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    while step < steps:
        if step == full_from and full_batch != batch:
            batches = _loader(train_ds, full_batch, run, seed + step)
        for g, lr in zip(opt.param_groups, base_lr, strict=True):
            g["lr"] = lr * lr_factor(step, steps, cfg.train)
        b = _to(next(batches), device)
        crop = (cfg.train.crop_stage0, cfg.train.crop_stage1, 0)[stage]
        if crop and crop < b["x"].shape[-1] and step < full_from:
            b = _random_crop(b, crop, gen)
        x, present = b["x"], b["present"]
        with run.autocast(bf16):
            if stage == 0:
                loss, logs, (x1, x_rec) = _autoencoder_loss(model, wrapped, wrapped_d, x, present, gen, step)
            elif stage == 1:
                loss, logs = _structure_loss(model, wrapped, b, masker)
            else:
                z0, f_s, available, rows = cache.batch(b["index"].cpu(), gen, masker, present)
                if cfg.diffusion.image_weight:  # the image term compares with the images of the drawn views
                    x = cache.images(x, rows)
                logs = {}
                loss = model.diffusion_training_loss(
                    x, available, gen, z0=z0.to(device), f_s=None if f_s is None else f_s.to(device), unet=wrapped,
                    present=present, parts=logs,
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = (
            torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.train.grad_clip) if cfg.train.grad_clip else None
        )
        opt.step()
        if opt_d is not None and step >= cfg.autoencoder.disc_start and cfg.autoencoder.disc_weight > 0:
            with run.autocast(bf16):
                d_loss = hinge_d_loss(wrapped_d(x1), wrapped_d(x_rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            logs["d_loss"] = d_loss.item()
        if ema is not None:
            ema.update(trainable, step)
        step += 1
        bar.update(1)
        logs["loss"] = loss.item()
        logs["lr"] = opt.param_groups[0]["lr"]
        if gn is not None:
            logs["grad_norm"] = float(gn)
        if step % cfg.train.log_every == 0 or step == steps:
            run.log({"stage": stage, "step": step, "split": "train", **{k: round(v, 6) for k, v in logs.items()}})
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if step % cfg.train.val_every == 0 or step == steps:
            last_val = validate(stage, model, val_ds, run, ema)
            run.log({"stage": stage, "step": step, "split": "val", **last_val})
            trainable.train()
        if step % cfg.train.ckpt_every == 0 or step == steps:
            _save_stage(run, stage, snapshot())
    bar.close()
    return last_val


def _random_crop(b: dict, size: int, gen: torch.Generator) -> dict:
    """The same random ``size``-squared in-plane crop of every image and label of a batch."""
    h, w = b["x"].shape[-2:]
    i = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    j = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return {**b, "x": b["x"][..., i : i + size, j : j + size], "seg": b["seg"][..., i : i + size, j : j + size]}


def _set_latent_scale(model: MSGLDM, run: Run, scale: float) -> None:
    """The measured latent scale into the model's config and the run's ``config.json``."""
    model.cfg = model.cfg.replace({"diffusion.latent_scale": scale})
    if run.is_main:
        (run.out / "config.json").write_text(model.cfg.to_json() + "\n")


def apply_gamma(x: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Images ``x (N, M, H, W)`` in [-1, 1] with each ``(slice, modality)`` remapped on [0, 1] as ``u ** gamma``
    (``gammas (N, M)``): background (-1) and the maximum (1) stay, the tissue's level moves."""
    u = ((x.float() + 1) / 2).clamp(0, 1)
    return (u ** gammas[:, :, None, None].float() * 2 - 1).to(x.dtype)


def view_kinds(cfg: MSGLDMConfig) -> list[str]:
    """The stage-2 cache's views of every training slice, in row order: the slices, then ``mirror``
    (``train.stage2_mirror``), ``shift`` (``stage2_shift``), ``gamma`` (``stage2_gamma``)."""
    t = cfg.train
    return ["slices"] + [k for k, on in (("mirror", t.stage2_mirror), ("shift", t.stage2_shift),
                                          ("gamma", t.stage2_gamma > 0)) if on]


def augment_view(x: torch.Tensor, kind: str, cfg: MSGLDMConfig, gammas: torch.Tensor | None = None) -> torch.Tensor:
    """Slices ``x (B, M, H, W)`` as the cache view ``kind`` sees them: mirrored left-right, shifted by half a latent
    cell down and right (:func:`model.slices.view_forward`), or gamma-remapped by ``gammas (B, M)``."""
    if kind == "mirror":
        return view_forward(x, (True, 0))
    if kind == "shift":
        return view_forward(x, (False, cfg.autoencoder.downsample_factor // 2))
    if kind == "gamma":
        if gammas is None:
            raise ValueError("the gamma view needs the slices' gammas")
        return apply_gamma(x, gammas.to(x.device))
    return x


class Stage2Cache:
    """What does not change between stage-2 steps, computed once with the frozen stages 0-1.

    ``z (N, 4M, h, w)``: every slice's latents, scaled by ``diffusion.latent_scale`` (measured here as 1/std of the
    training latents when ``latent_scale_from_data``; the model's config is updated with it). With
    ``train.fs_cache_subsets = K > 0``: ``f_s (N, K, C, h, w)`` float16 for K random input subsets per slice
    (``subsets (N, K, M)``), drawn by the training masker; each step then picks one of them per sample. The
    per-modality encoder features do not depend on the subset, so they are computed once per slice. Augmented
    *views* add ``N`` rows each, encoded and fused from the changed images (with their own subsets): with
    ``train.stage2_mirror`` slice ``i`` mirrored left-right, with ``train.stage2_shift`` shifted by half a latent
    cell, with ``train.stage2_gamma`` each modality of slice ``i`` remapped by its own random gamma
    (``gammas (N, M)``); rows ``v N + i`` are view ``v`` of slice ``i`` (:func:`view_kinds`' order) and
    :meth:`batch` picks a view at random per sample; :meth:`images` shows a batch's images as its rows' views do
    (the image term of ``diffusion.image_weight`` compares with those).
    """

    def __init__(self, z: torch.Tensor, f_s: torch.Tensor | None, subsets: torch.Tensor | None, model: MSGLDM,
                 gammas: torch.Tensor | None = None):
        self.z, self.f_s, self.subsets, self.model = z, f_s, subsets, model
        self.kinds, self.gammas = view_kinds(model.cfg), gammas
        self.views = len(self.kinds)

    def images(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The batch's images ``x (B, M, H, W)`` (its slices' own) as its cache ``rows`` (from :meth:`batch`) see
        them."""
        if self.views == 1:
            return x
        out, kind_of = x.clone(), (rows // self.slices).to(x.device)
        for v, kind in enumerate(self.kinds[1:], start=1):
            sel = (kind_of == v).nonzero().squeeze(1)
            if sel.numel():
                g = None if self.gammas is None else self.gammas[rows[sel.cpu()] % self.slices]
                out[sel] = augment_view(x[sel], kind, self.model.cfg, g).to(x.dtype)
        return out

    @classmethod
    @torch.no_grad()
    def build(cls, model: MSGLDM, ds: SliceDataset, run: Run, seed: int, chunk: int = 32) -> Stage2Cache:
        """Computed, or read back from ``OUT/stage2_cache.pt`` (written on the first build: a resumed or repeated
        stage 2 on the same stages 0-1 and slices skips the encoding)."""
        path = run.out / "stage2_cache.pt"
        gamma = model.cfg.train.stage2_gamma
        key = {"slices": len(ds), "origin": ds.origin[:3] + ds.origin[-3:], "subsets": model.cfg.train.fs_cache_subsets}
        key |= {kind: gamma if kind == "gamma" else True for kind in view_kinds(model.cfg)[1:]}
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)  # our own file in the run directory
            measured = model.cfg.diffusion.latent_scale_from_data  # then the saved scale is this data's measurement
            if saved.get("key") == json.dumps(key) and (
                measured or saved["latent_scale"] == model.cfg.diffusion.latent_scale
            ):
                if measured and saved["latent_scale"] != model.cfg.diffusion.latent_scale:
                    _set_latent_scale(model, run, float(saved["latent_scale"]))
                log.info("stage-2 cache read from %s (latent scale %.6f)", path, model.cfg.diffusion.latent_scale)
                return cls(saved["z"], saved.get("f_s"), saved.get("subsets"), model, saved.get("gammas"))
        t0 = time.time()
        bf16 = model.cfg.train.cpu_bf16
        model.autoencoder.eval()
        model.structure.eval()
        scale = model.cfg.diffusion.latent_scale
        gammas = None
        if gamma:
            g = torch.Generator().manual_seed(seed + 11)
            bound = math.log1p(gamma)
            gammas = torch.exp((torch.rand(ds.x.shape[:2], generator=g) * 2 - 1) * bound)  # (N, M), log-uniform
        # rows v N + i: view v of slice i, made chunk by chunk (no copy of the whole slice stack per view)
        views: list[Callable[[slice], torch.Tensor]] = [
            lambda r, kind=kind: augment_view(ds.x[r], kind, model.cfg, None if gammas is None else gammas[r])
            for kind in view_kinds(model.cfg)]
        present = torch.cat([ds.present] * len(views))
        chunks = [slice(start, min(start + chunk, len(ds))) for start in range(0, len(ds), chunk)]
        raw = []
        for view in views:
            for r in chunks:
                x = view(r).float().to(run.device)
                with run.autocast(bf16):
                    raw.append((model.encode_latents(x).float() / scale).cpu())
        z = torch.cat(raw)
        if model.cfg.diffusion.latent_scale_from_data:
            scale = round(1.0 / float(z.std()), 6)
            _set_latent_scale(model, run, scale)
            log.info("latent scale measured on %d training slices: 1/std = %.4f", len(ds), scale)
        z = z * scale
        k = model.cfg.train.fs_cache_subsets
        f_s = subsets = None
        if k:
            masker = ModalityMasker(torch.Generator().manual_seed(seed + 7))
            subsets = torch.stack([masker(present) for _ in range(k)], 1)  # (views x N, K, M)
            parts = []
            for v, view in enumerate(views):
                for r in chunks:
                    x = view(r).float().to(run.device)
                    rows = slice(v * len(ds) + r.start, v * len(ds) + r.stop)
                    sub = subsets[rows].to(run.device)
                    with run.autocast(bf16):
                        feats = model.structure.modality_features(x, present[rows].to(run.device))
                        per_subset = [model.structure.fuse(feats, sub[:, i])["f_s"].float() for i in range(k)]
                    parts.append(torch.stack(per_subset, 1).half().cpu())
            f_s = torch.cat(parts)
        if run.is_main:
            blob = {"key": json.dumps(key), "latent_scale": scale, "z": z, "views": len(views), "gammas": gammas}
            if f_s is not None:
                blob.update(f_s=f_s, subsets=subsets)
            torch.save(blob, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        run.log(
            {
                "stage": 2,
                "step": 0,
                "split": "cache",
                "slices": len(ds),
                "latent_scale": scale,
                "fs_subsets": k,
                "wall_s": round(time.time() - t0, 1),
            }
        )
        return cls(z, f_s, subsets, model, gammas)

    @property
    def slices(self) -> int:
        """Training slices the cache covers (its rows: that many per view)."""
        return len(self.z) // self.views

    def batch(
        self, index: torch.Tensor, gen: torch.Generator, masker: ModalityMasker, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(z0, f_s, available, rows)`` for the slices ``index``; ``f_s`` None without an F_s cache (the model
        computes it from the batch's images then). With augmented views, each sample draws one of its slice's;
        ``rows`` are the cache rows drawn (for :meth:`images`)."""
        if self.views > 1:
            index = index + self.slices * torch.randint(0, self.views, (len(index),), generator=gen)
        z0 = self.z[index]
        if self.f_s is None:
            return z0, None, masker(present), index
        pick = torch.randint(0, self.f_s.shape[1], (len(index),), generator=gen)
        return z0, self.f_s[index, pick].float(), self.subsets[index, pick], index


@torch.no_grad()
def validate(stage: int, model: MSGLDM, ds: SliceDataset, run: Run, ema: EMA | None = None) -> dict:
    """Fixed-seed validation metrics of one stage on up to ``val_batches`` batches (PSNRs over the brain)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1234)
    masker = ModalityMasker(gen)
    n = min(len(ds), cfg.train.val_batches * cfg.train.batch_size)
    idx = torch.linspace(0, len(ds) - 1, n).long()
    metrics: dict[str, list[float]] = {}
    model.eval()
    for start in range(0, n, cfg.train.batch_size):
        b = _to(
            {
                k: torch.stack([ds[int(i)][k] for i in idx[start : start + cfg.train.batch_size]])
                for k in ("x", "present", "seg", "has_seg")
            },
            run.device,
        )
        x, present = b["x"], b["present"]
        brain = _brain(x, present)
        with run.autocast(cfg.train.cpu_bf16):
            if stage == 0:
                bm, m = x.shape[:2]
                flat = x.reshape(bm * m, 1, *x.shape[-2:])
                keep = present.reshape(-1)
                z, _ = model.autoencoder.encode(flat[keep])
                rec = model.autoencoder.decode(z).float()
                mask = brain.expand(-1, m, -1, -1).reshape(bm * m, 1, *x.shape[-2:])[keep]
                metrics.setdefault("l1", []).append(F.l1_loss(rec.clamp(-1, 1), flat[keep]).item())
                metrics.setdefault("psnr", []).append(_psnr01(rec, flat[keep]))
                metrics.setdefault("brain_psnr", []).append(_psnr01(rec, flat[keep], mask))
            elif stage == 1:
                available = masker(present)
                out = model.structure(x, available)
                rec = out["recon"].float()
                missing = present & ~available
                if missing.any():
                    mask = brain.expand_as(rec)[missing]
                    metrics.setdefault("l1_missing", []).append(F.l1_loss(rec[missing], x[missing]).item())
                    metrics.setdefault("psnr_missing", []).append(_psnr01(rec[missing], x[missing], mask))
                metrics.setdefault("l1_all", []).append(F.l1_loss(rec[present], x[present]).item())
                if b["has_seg"].any():
                    prob = torch.sigmoid(out["seg_logits"].float())[b["has_seg"]]
                    metrics.setdefault("dice_wt", []).append(_dice(prob[:, 1], b["seg"][b["has_seg"]][:, 1]))
            else:
                available = masker(present)
                unet = ema.shadow if ema is not None else model.unet
                parts: dict[str, float] = {}
                metrics.setdefault("diffusion_loss", []).append(
                    model.diffusion_training_loss(x, available, gen, unet=unet, present=present, parts=parts).item()
                )
                for name, value in parts.items():  # with diffusion.image_weight: the latent and image terms
                    metrics.setdefault(f"{name}_loss", []).append(value)
    return {k: round(sum(v) / len(v), 6) for k, v in metrics.items()}


def _gate(stage: int, model: MSGLDM, train_ds: SliceDataset, val_ds: SliceDataset, run: Run):
    """The gate after ``stage`` (model.gates) with that stage's weights (stage 2: the EMA UNet) loaded."""
    from model import gates

    cfg = model.cfg
    model.eval()
    with run.autocast(cfg.train.cpu_bf16):
        if stage == 0:
            return gates.stage0(model, val_ds, cfg.train.gate_stage0_psnr)
        if stage == 1:
            return gates.stage1(model, train_ds, val_ds)
        state = _load_stage(run, 2) or {}
        if "ema" in state:
            model.unet.load_state_dict(state["ema"])
        z_mean = state.get("z_mean")
        if z_mean is None:
            z_mean = torch.zeros(cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        return gates.stage2(model, val_ds, z_mean, cfg.train.gate_stage2_spread, cfg.train.gate_stage2_ratio)


# ----------------------------------------------------------------------------------------------- CLI


def _parse_steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise SystemExit(f"--max-steps takes N or N0,N1,N2 (non-negative), got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny", help="preset name (brats, wmh, ixi, tiny) or a YAML file")
    p.add_argument("--stage", default="all", choices=["0", "1", "2", "all"])
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="dataset folder(s) or case folder(s); several paths train on exactly those cases",
    )
    p.add_argument("--layout", default="auto")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="fine-tune: start from this inference checkpoint (its config is the run's; stages not trained keep "
        "its weights)",
    )
    p.add_argument("--max-steps", default=None, help="steps per stage: N (all stages) or N0,N1,N2")
    p.add_argument("--epochs", type=float, default=None, help="alternative to --max-steps: epochs per stage")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="subject-level validation split (0: validate on a fixed subset of the training slices)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-gates", action="store_true", help="go on to the next stage when a gate fails")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. unet.base_channels=64 diffusion.default_steps=25 (YAML values)",
    )
    return p


def _device() -> tuple[int, int, torch.device]:
    """``(world size, rank, device)`` from torchrun's environment (one CPU process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        return world, rank, torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return world, rank, torch.device("cuda", local)


def _run_config(args: argparse.Namespace) -> MSGLDMConfig:
    """The preset's (or the --init checkpoint's) config; when resuming, the run's own; then the --set overrides."""
    import yaml

    cfg = read_config(args.init) if args.init else load_preset(args.preset)
    saved_cfg = args.out / "config.json"
    if saved_cfg.is_file():  # resuming: the run's own config wins (the preset may have changed since)
        cfg = MSGLDMConfig.from_dict(json.loads(saved_cfg.read_text()))
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    return cfg.replace(overrides) if overrides else cfg


def _split(args: argparse.Namespace, cfg: MSGLDMConfig, seed: int, val_fraction: float) -> dict[str, list]:
    """The subject-level train / val / test split of the --data cases (everything trains when there is one subject)."""
    cases = find_cases(args.data, layout=args.layout, modalities=cfg.modalities)
    test_fraction = cfg.train.test_fraction
    if (val_fraction > 0 or test_fraction > 0) and len({c.subject for c in cases}) > 1:
        return split_cases(
            cases, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, test_cases=cfg.train.test_cases
        )
    return {"train": list(cases), "val": [], "test": []}


def _write_run_files(out: Path, cfg: MSGLDMConfig, splits: dict[str, list], train_ds: SliceDataset, *, seed: int,
                     val_fraction: float, data: list[Path]) -> None:
    (out / "config.json").write_text(cfg.to_json() + "\n")
    record = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": cfg.train.test_fraction,
        **{name: [c.id for c in splits[name]] for name in ("train", "val", "test")},
        "validation_on": "val" if splits["val"] else "train subset",
        "train_slices": len(train_ds),
        "data": [str(d) for d in data],
    }
    (out / "split.json").write_text(json.dumps(record, indent=2) + "\n")


def _init_from(model: MSGLDM, init: Path) -> set[int]:
    """Load the --init checkpoint's parts; the stages whose part does not fit this config (they start afresh)."""
    fresh: set[int] = set()
    base = load_checkpoint(init)
    for stage, part in enumerate(PARTS):
        try:
            getattr(model, part).load_state_dict(getattr(base, part).state_dict())
        except RuntimeError as exc:  # e.g. --set autoencoder.latent_channels=16: that stage starts afresh
            fresh.add(stage)
            log.info("--init: the %s of %s does not fit this config (%s): stage %d starts from random weights",
                     part, init, str(exc).splitlines()[0], stage)
    return fresh


def main(argv: list[str] | None = None) -> Path | None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    world, rank, device = _device()
    cfg = _run_config(args)
    out: Path = args.out
    seed = cfg.train.seed if args.seed is None else args.seed
    batch = args.batch_size or cfg.train.batch_size
    val_fraction = cfg.train.val_fraction if args.val_fraction is None else args.val_fraction
    torch.manual_seed(seed)

    splits = _split(args, cfg, seed, val_fraction)
    run = Run(out, device, rank, world)
    train_ds = SliceDataset(splits["train"], cfg)
    val_ds = SliceDataset(splits["val"], cfg) if splits["val"] else train_ds
    spacing = tuple(round(float(s), 4) for s in train_ds.spacings[0]) if train_ds.spacings else None
    if cfg.train_spacing is None and spacing is not None:
        cfg = cfg.replace({"train_spacing": list(spacing)})
    if run.is_main:
        _write_run_files(out, cfg, splits, train_ds, seed=seed, val_fraction=val_fraction, data=args.data)
    steps_cfg = [cfg.train.stage0_steps, cfg.train.stage1_steps, cfg.train.stage2_steps]
    steps = _parse_steps(args.max_steps) or steps_cfg
    if args.epochs is not None:
        steps = [max(1, math.ceil(args.epochs * len(train_ds) / (batch * world)))] * 3
    stages = [0, 1, 2] if args.stage == "all" else [int(args.stage)]

    torch.manual_seed(seed)
    model = MSGLDM(cfg).to(device)
    # stages whose part the base checkpoint cannot fill (a changed shape): trained here
    fresh = _init_from(model, args.init) if args.init else set()
    results: dict = {}
    for stage in range(3):
        if stage in stages:
            t = time.time()
            per_stage = cfg.train.stage_batch_sizes
            stage_batch = per_stage[stage] if per_stage and not args.batch_size else batch
            run.begin_stage(stage, steps[stage], stage_batch, len(train_ds))
            results[stage] = train_stage(stage, model, train_ds, val_ds, run, steps[stage], stage_batch, seed)
            if world > 1:
                dist.barrier()  # rank 0 has written stage{k}.pt before any rank loads it below
            run.log({"stage": stage, "step": steps[stage], "split": "summary", "wall_s": round(time.time() - t, 1)})
        if stage < 2 and (max(stages) == 2 or stage in stages):  # stage 2 needs the trained (frozen) stages 0, 1
            state = _load_stage(run, stage)
            if state is None and args.init and stage not in fresh:
                continue  # not trained in this run: the base checkpoint's weights stand
            if state is None:
                raise SystemExit(
                    f"stage {max(stages)} needs stage {stage}: {_stage_path(run, stage)} does not exist; "
                    f"run --stage {stage} (or --stage all) first"
                )
            getattr(model, PARTS[stage]).load_state_dict(state["model"])
            fresh.discard(stage)
            results.setdefault(stage, state.get("val", {}))
        if stage in stages and run.is_main:
            gate = _gate(stage, model, train_ds, val_ds, run)
            run.log({"split": "gate", **gate.to_dict(), "step": steps[stage]})
            log.info("%s", gate.message())
            if not gate.passed and cfg.train.gates and not args.ignore_gates:
                raise SystemExit(
                    f"{gate.message()}; details in {out / 'progress.json'} (gates). The run stops here: the next "
                    f"stage would be built on a stage that does not do its job. Rerun the same command with "
                    f"--ignore-gates to go on."
                )
    if world > 1:
        dist.barrier()
    unfilled = fresh - set(stages)  # random parts: neither the base, this run nor OUT/stage{k}.pt filled them
    if unfilled and run.is_main:
        log.info("no inference checkpoint yet: stage(s) %s still have random weights (run them)", sorted(unfilled))
    if (2 not in stages and not args.init) or unfilled or not run.is_main:
        return None  # without stage 2 (and nothing to fine-tune from) there is no servable model yet
    metrics = _metrics(run, args.init, results, batch=batch, world=world)
    state2 = _load_stage(run, 2)
    dest = save_checkpoint(model, out / "model", metrics=metrics, unet_state=state2.get("ema") if state2 else None)
    log.info("inference checkpoint written to %s", dest)
    return dest


def _metrics(run: Run, init: Path | None, results: dict, *, batch: int, world: int) -> dict:
    """The inference checkpoint's metrics.json: steps, validation, gates and split; a fine-tune's base too."""
    base = json.loads((init / "metrics.json").read_text()) if init else {}
    steps_done = {f"stage{k}": (_load_stage(run, k) or {}).get("step") for k in range(3)}
    metrics = {
        "trained": True,
        "steps": {k: v if v is not None else (base.get("steps") or {}).get(k) for k, v in steps_done.items()},
        "validation": {**base.get("validation", {}), **{f"stage{k}": v for k, v in results.items()}},
        "gates": {**base.get("gates", {}), **run.progress["gates"]},
        "split": json.loads((run.out / "split.json").read_text()),
        "batch_size": batch,
        "world_size": world,
        "device": str(run.device),
        "wall_s_this_invocation": round(time.time() - run.t0, 1),
    }
    if init:  # a fine-tune: what it started from, and which stages this run folder trained (any invocation)
        metrics["fine_tuned_from"] = {"version": base.get("version") or checkpoint_version(init),
                                      "stages": [k for k, v in steps_done.items() if v is not None],
                                      "base_steps": base.get("steps")}
    return metrics


if __name__ == "__main__":
    main()
