"""What the service worker calls: a loaded checkpoint that turns a study (Volumes) into the missing sequences.

synth = Synthesizer.from_pretrained("model/default")
result = synth.synthesize({"t1": t1, "t2": t2, "t1ce": t1ce}, ["flair"], steps=25, seed=0)
result.volumes["flair"]  # Volume on the reference input's grid, float32 in [0, 1]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import checkpoint_version, load_checkpoint
from model.config import MSGLDMConfig, canonical_modality
from model.errors import TargetError, UnknownModalityError
from model.io.volume import Volume
from model.msgldm import MSGLDM
from model.preprocess import PreparedStudy, prepare_study, restore_volume
from model.slices import test_time_views, view_back, view_forward

Progress = Callable[[str, float], None]
DENOISE_MEMORY_BYTES = 2 << 30  # activation budget of one UNet forward (CPU; on CUDA half the free memory if more)
# overall-progress share of each phase (denoise dominates)
_PHASES = {
    "preprocess": (0.0, 0.03),
    "encode": (0.03, 0.08),
    "denoise": (0.08, 0.92),
    "decode": (0.92, 0.98),
    "postprocess": (0.98, 1.0),
}


@dataclass
class SynthesisResult:
    volumes: dict[str, Volume]  # per target, on the reference grid, float32 in [0, 1]
    uncertainty: dict[str, Volume] | None  # voxelwise std over samples (same scale) when samples > 1
    timings: dict[str, float]  # seconds per phase, and "total"
    meta: dict = field(default_factory=dict)  # version, steps, seed, samples, available, reference, device


class Synthesizer:
    """A loaded MSG-LDM checkpoint on one device. Not thread-safe: one synthesis at a time.

    ``precision``: ``"auto"`` (bf16 autocast for every stage on CUDA; on a CPU with bf16 support, bf16 for the
    full-resolution structure encoders and autoencoder decoder, fp32 for the latent-resolution UNet, which bf16
    slows down on CPU), ``"bf16"`` (every stage) or ``"fp32"`` (none). On the CPU the full-resolution stages run
    channels-last. ``chunk_size`` slices per forward at full resolution; the denoiser takes as many slices per
    forward as :data:`DENOISE_MEMORY_BYTES` allows (``denoise_chunk_size``).
    """

    def __init__(
        self,
        model: MSGLDM,
        version: str,
        device: torch.device,
        chunk_size: int | None = None,
        precision: str = "auto",
    ) -> None:
        self.model = model.eval()
        self.version = version
        self.device = device
        self.config: MSGLDMConfig = model.cfg
        self.modalities: tuple[str, ...] = model.cfg.modalities
        self.default_steps: int = model.cfg.diffusion.default_steps
        default_chunk = self.config.chunk_size_cuda if device.type == "cuda" else self.config.chunk_size_cpu
        self.chunk_size = int(chunk_size or default_chunk)
        self.precision = precision
        self.stage_dtypes = stage_dtypes(precision, device)
        if device.type == "cpu":  # oneDNN convolutions and group norms are fastest on NHWC tensors
            self.model.structure.to(memory_format=torch.channels_last)
            self.model.autoencoder.to(memory_format=torch.channels_last)
        self._memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | None = None, chunk_size: int | None = None, precision: str = "auto"
    ) -> Synthesizer:
        """Load a checkpoint directory; ``device`` None picks CUDA when available, else CPU."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(load_checkpoint(path, dev), checkpoint_version(path), dev, chunk_size, precision)

    def denoise_chunk_size(self, slices: int) -> int:
        """Slices per UNet forward: all of them when the estimated activations fit the memory budget."""
        c = self.config.unet.base_channels * max(self.config.unet.channel_mult)
        per_slice = 4 * 32 * c * self.config.latent_size**2  # ~32 live fp32 feature maps of the widest level
        budget = DENOISE_MEMORY_BYTES
        if self.device.type == "cuda":
            budget = max(budget, int(torch.cuda.mem_get_info(self.device)[0] * 0.5))
        return max(1, min(slices, budget // per_slice))

    # ------------------------------------------------------------------ helpers

    def _targets(self, study: dict[str, Volume], targets: Sequence[str]) -> list[str]:
        given = {canonical_modality(m) for m in study}
        unknown = sorted(given - set(self.modalities))
        if unknown:
            raise UnknownModalityError(
                f"input modality {unknown} is not one this model ({self.version}) was built for: "
                f"{', '.join(self.modalities)}"
            )
        if isinstance(targets, str):
            targets = [targets]
        out: list[str] = []
        for t in targets:
            m = canonical_modality(t)
            if m not in self.modalities:
                raise UnknownModalityError(
                    f"target {t!r} is not one this model ({self.version}) can synthesize: {', '.join(self.modalities)}"
                )
            if m in given:
                raise TargetError(f"target {t!r} is also an input: only absent modalities can be synthesized")
            if m not in out:
                out.append(m)
        if not out:
            raise TargetError(
                f"no target given: name at least one of the absent modalities "
                f"{', '.join(m for m in self.modalities if m not in given)}"
            )
        return out

    def _autocast(self, stage: str) -> torch.autocast:
        dtype = self.stage_dtypes[stage]
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device).contiguous(memory_format=self._memory_format)

    # ------------------------------------------------------------------ API

    def prepare(self, study: dict[str, Volume]) -> PreparedStudy:
        return prepare_study(study, self.modalities, self.config.preprocess, align=True,
                             train_spacing=self.config.train_spacing)

    def synthesize(
        self,
        study: dict[str, Volume],
        targets: Sequence[str],
        *,
        steps: int | None = None,
        seed: int = 0,
        samples: int = 1,
        progress: Progress | None = None,
        eta: float | None = None,
        replace_known: bool | None = None,
    ) -> SynthesisResult:
        """Synthesize ``targets`` (absent modalities) from the study's volumes (aliases such as ``t1n`` accepted).

        Phases: 1 preprocess (volumes -> slices), 2 encode (structure condition F_s), 3 denoise (DDIM, all
        modalities jointly, ``samples`` times), 4 decode (targets' latents -> images), 5 postprocess (slices ->
        volumes on the reference grid). ``progress(phase, fraction)`` is called at each phase change and after every
        diffusion step; an exception raised by it propagates (cancellation). Deterministic for a seed.
        """
        steps = int(steps or self.default_steps)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        target_names = self._targets(study, targets)
        timings: dict[str, float] = {}
        t_all = time.perf_counter()

        def enter(phase: str) -> float:
            if progress is not None:
                progress(phase, _PHASES[phase][0])
            return time.perf_counter()

        # 1. preprocess
        t0 = enter("preprocess")
        prepared = self.prepare(study)
        timings["preprocess"] = time.perf_counter() - t0
        x = torch.from_numpy(prepared.x)
        available_row = torch.tensor(prepared.available, dtype=torch.bool)
        n = x.shape[0]
        target_idx = [self.modalities.index(m) for m in target_names]
        known_idx = [i for i, a in enumerate(prepared.available) if a]
        replace_known = self.config.diffusion.replace_known if replace_known is None else replace_known
        need_known = self.model.needs_known_latents(replace_known)
        cs = self.chunk_size

        # beyond the paper (diffusion.test_time_views > 1): every sample also synthesizes the slices mirrored
        # left-right and/or shifted by half a latent cell, maps each view back, and averages the views
        views = test_time_views(self.config.diffusion.test_time_views, self.config.autoencoder.downsample_factor // 2)
        with torch.inference_mode():
            # 2. encode: F_s once per volume and view (shared by every step and sample), and the known latents for
            # inpainting, chunk by chunk
            t0 = enter("encode")
            conditions = []
            for view in views:
                xv = view_forward(x, view)
                f_s, z_known = [], []
                with self._autocast("encode"):
                    for s in range(0, n, cs):
                        xc = self._to_device(xv[s : s + cs])
                        av = available_row.expand(xc.shape[0], -1).to(self.device)
                        f_s.append(self.model.condition(xc, av).float().contiguous())
                        if need_known:
                            z_known.append(self.model.encode_latents(xc, known_idx).float().contiguous())
                conditions.append((torch.cat(f_s), torch.cat(z_known) if need_known else None))
            timings["encode"] = time.perf_counter() - t0

            # 3. denoise, K samples (x views)
            t0 = enter("denoise")
            lo, hi = _PHASES["denoise"]
            runs = [(k, v) for k in range(samples) for v in range(len(views))]
            latents = []
            for r, (k, v) in enumerate(runs):

                def on_step(i: int, total: int, r: int = r) -> None:
                    if progress is not None:
                        progress("denoise", min(hi, lo + (hi - lo) * (r * total + i) / (len(runs) * total)))

                sample_seed = int(np.random.SeedSequence([int(seed), k]).generate_state(1)[0])
                f_s_all, z0_known = conditions[v]
                with self._autocast("denoise"):
                    latents.append(
                        self.model.denoise(
                            f_s_all,
                            steps,
                            eta=eta,
                            seed=sample_seed,
                            chunk_size=self.denoise_chunk_size(n),
                            z0_known=z0_known,
                            known=available_row.expand(n, -1).to(self.device) if need_known else None,
                            replace_known=replace_known,
                            callback=on_step,
                        ).cpu()
                    )
            timings["denoise"] = time.perf_counter() - t0

            # 4. decode only the targets' latents (each view mapped back), the views of a sample averaged
            t0 = enter("decode")
            images = np.zeros((samples, len(target_idx), n, *x.shape[-2:]), dtype=np.float32)
            with self._autocast("decode"):
                for (k, v), z in zip(runs, latents, strict=True):
                    for s in range(0, n, cs):
                        dec = self.model.decode_latents(self._to_device(z[s : s + cs]), target_idx).float().cpu()
                        dec = view_back(dec, views[v])
                        images[k, :, s : s + dec.shape[0]] += dec.permute(1, 0, 2, 3).numpy() / len(views)
            timings["decode"] = time.perf_counter() - t0

        # 5. postprocess: mean (and std) over samples, back to the reference grid
        t0 = enter("postprocess")
        volumes, uncertainty = {}, ({} if samples > 1 else None)
        for i, m in enumerate(target_names):
            volumes[m] = restore_volume(images[:, i].mean(0), prepared)
            if uncertainty is not None:
                std01 = ((images[:, i].clip(-1, 1) + 1) / 2).std(0)
                uncertainty[m] = restore_volume(std01, prepared, unit_range=True)
        timings["postprocess"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_all
        if progress is not None:
            progress("postprocess", 1.0)
        warnings = []
        if prepared.work_affine is not None:  # preprocess step 0: to the training voxel size and back
            given = np.sqrt((prepared.reference_affine[:3, :3] ** 2).sum(axis=0)).round(3).tolist()
            warnings.append(f"voxel size {given} mm resampled to the training data's "
                            f"{list(self.config.train_spacing or ())} mm for the model and back (interpolated)")
        meta = {
            "warnings": warnings,
            "version": self.version,
            "steps": steps,
            "seed": seed,
            "samples": samples,
            "eta": self.config.diffusion.eta if eta is None else eta,
            "replace_known": replace_known,
            "test_time_views": len(views),
            "available": [m for m, a in zip(self.modalities, prepared.available, strict=True) if a],
            "reference": prepared.reference,
            "resampled_to_reference": list(prepared.resampled),
            "work_grid": None if prepared.work_shape is None else {
                "shape": list(prepared.work_shape), "affine": np.round(prepared.work_affine, 6).tolist()},
            "slices": n,
            "device": str(self.device),
            "precision": {stage: str(dtype).removeprefix("torch.") for stage, dtype in self.stage_dtypes.items()},
        }
        return SynthesisResult(volumes=volumes, uncertainty=uncertainty, timings=timings, meta=meta)

    def autoencode(self, study: dict[str, Volume]) -> dict[str, Volume]:
        """Every volume of the study through the checkpoint's own autoencoder (encode, decode; no diffusion), on the
        reference grid in [0, 1]: what a perfect stage 2 (the true latent) would synthesize, the ceiling the
        evaluation reports beside the samples."""
        prepared = self.prepare(study)
        x = torch.from_numpy(prepared.x)
        idx = [i for i, a in enumerate(prepared.available) if a]
        images = np.zeros((len(idx), x.shape[0], *x.shape[-2:]), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, x.shape[0], self.chunk_size):
                xc = self._to_device(x[s : s + self.chunk_size])
                with self._autocast("encode"):
                    z = self.model.encode_latents(xc).float()
                with self._autocast("decode"):
                    dec = self.model.decode_latents(z, idx).float().cpu()
                images[:, s : s + dec.shape[0]] = dec.permute(1, 0, 2, 3).numpy()
        return {self.modalities[i]: restore_volume(images[k], prepared) for k, i in enumerate(idx)}

    def segment(self, study: dict[str, Volume]) -> dict[str, Volume]:
        """The structure model's segmentation ("structure-model segmentation") from the study's volumes:
        probability maps ``{"WT", "TC", "ET"}`` on the reference grid, float32 in [0, 1]."""
        prepared = self.prepare(study)
        x = torch.from_numpy(prepared.x)
        av_row = torch.tensor(prepared.available, dtype=torch.bool)
        probs = []
        with torch.inference_mode(), self._autocast("encode"):
            for s in range(0, x.shape[0], self.chunk_size):
                xc = self._to_device(x[s : s + self.chunk_size])
                probs.append(
                    self.model.structure.segment(xc, av_row.expand(xc.shape[0], -1).to(self.device)).float().cpu()
                )
        p = torch.cat(probs).numpy()
        return {
            r: restore_volume(p[:, i], prepared, unit_range=True) for i, r in enumerate(("WT", "TC", "ET"), start=1)
        }


PRECISIONS = ("auto", "fp32", "bf16")
STAGES = ("encode", "denoise", "decode")


def stage_dtypes(precision: str, device: torch.device) -> dict[str, torch.dtype]:
    """The compute dtype of each stage for a ``precision`` setting on ``device`` (see :class:`Synthesizer`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bf16, fp32 = torch.bfloat16, torch.float32
    if precision == "fp32":
        return dict.fromkeys(STAGES, fp32)
    if precision == "bf16" or device.type == "cuda":
        return dict.fromkeys(STAGES, bf16)
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return {"encode": bf16, "denoise": fp32, "decode": bf16}
    return dict.fromkeys(STAGES, fp32)
