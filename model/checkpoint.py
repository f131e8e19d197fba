"""Inference checkpoints as directories (diffusers style): everything to rebuild the model, nothing else.

``config.json``          the full :class:`~model.config.MSGLDMConfig` (modalities, preprocessing, sampler defaults)
``autoencoder.safetensors``, ``structure.safetensors``, ``unet.safetensors`` (the UNet's EMA weights)
``metrics.json``         training/evaluation record (may be ``{}``)

:func:`export_for_serving` writes a compact copy for the service: float16 weights and without the structure
model's training-only parts (the reconstruction decoders D_rec and the style encoders, which synthesis and
segmentation never run); :func:`load_checkpoint` reads both forms into float32 modules.

The version is a content hash of config.json and the weight files: ``msgldm-<name>-<12 hex>``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import MSGLDMConfig, load_preset, read_config
from model.errors import CheckpointError
from model.msgldm import MSGLDM

# structure-model parameters used only by the stage-1 losses (D_rec, E_sty, the L_sc temperature)
TRAINING_ONLY = ("decoders.", "style_encoders.", "log_tau")
WEIGHT_FILES = {
    "autoencoder": "autoencoder.safetensors",
    "structure": "structure.safetensors",
    "unet": "unet.safetensors",
}


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    model: MSGLDM, out_dir: str | Path, metrics: dict | None = None, unet_state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``model`` (with ``unet_state``, e.g. the EMA weights, in place of its UNet's) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(model.cfg.to_json() + "\n")
    meta = {"format": "msgldm", "config": "config.json"}
    save_file(_contiguous(model.autoencoder.state_dict()), str(out / WEIGHT_FILES["autoencoder"]), metadata=meta)
    save_file(_contiguous(model.structure.state_dict()), str(out / WEIGHT_FILES["structure"]), metadata=meta)
    save_file(
        _contiguous(unet_state if unet_state is not None else model.unet.state_dict()),
        str(out / WEIGHT_FILES["unet"]),
        metadata={**meta, "ema": str(unet_state is not None)},
    )
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True) + "\n")
    for name in WEIGHT_FILES.values():  # safetensors writes 0600; a served model must be readable by its workers
        (out / name).chmod(0o644)
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> MSGLDM:
    """Rebuild the model from a checkpoint directory, in eval mode on ``device``."""
    path = Path(path)
    cfg = read_config(path)
    model = MSGLDM(cfg)
    for part, name in WEIGHT_FILES.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
        module = getattr(model, part)
        state = load_file(str(f))
        training_only = {k for k in module.state_dict() if part == "structure" and k.startswith(TRAINING_ONLY)}
        compact = bool(training_only) and not training_only & set(state)
        try:  # float16 tensors of an export are cast into the float32 parameters
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{f} does not match config.json: {exc}") from exc
        bad = sorted(set(missing) - (training_only if compact else set())) + sorted(unexpected)
        if bad:
            raise CheckpointError(f"{f} does not match config.json: missing or unexpected keys {bad[:8]}")
    return model.to(device).eval()


def export_for_serving(src: str | Path, dest: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """A serving copy of checkpoint ``src`` in ``dest``: weights in ``dtype``, without :data:`TRAINING_ONLY`
    (fine-tuning stage 1 from it starts those parts afresh). config.json and metrics.json are copied."""
    src, dest = Path(src), Path(dest)
    read_config(src)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.json"):
        (dest / name).write_bytes((src / name).read_bytes())
    for part, name in WEIGHT_FILES.items():
        state = load_file(str(src / name))
        if part == "structure":
            state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(_contiguous(state), str(dest / name),
                  metadata={"format": "msgldm", "config": "config.json", "export": f"serving {dtype}"})
        (dest / name).chmod(0o644)
    return dest


def checkpoint_version(path: str | Path) -> str:
    """``msgldm-<name>-<sha256[:12]>`` over config.json as stored and the weights' names, dtypes, shapes and values
    (tensor content, not file bytes: safetensors' header order is not stable between writes). The stored config,
    not the config re-serialised by today's code: a config field added later, at its default, must not change the
    version of every existing checkpoint (the registry and the docs name versions)."""
    path = Path(path)
    h = hashlib.sha256()
    cfg = read_config(path)  # validates it
    h.update((path / "config.json").read_text().strip().encode())
    for name in sorted(WEIGHT_FILES.values()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
        tensors = load_file(str(f))
        h.update(name.encode())
        for key in sorted(tensors):
            t = tensors[key].contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"msgldm-{cfg.name}-{h.hexdigest()[:12]}"


def init_checkpoint(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A complete checkpoint with RANDOM weights (service tests, fallback model). Deterministic for a seed."""
    cfg = load_preset(preset)
    torch.manual_seed(seed)
    model = MSGLDM(cfg)
    return save_checkpoint(model, out_dir, metrics={"trained": False, "note": "random weights", "seed": seed})


SAMPLER_FIELDS = ("diffusion.default_steps", "diffusion.eta", "diffusion.replace_known", "diffusion.test_time_views",
                  "chunk_size_cpu", "chunk_size_cuda")


def set_sampler(path: str | Path, overrides: dict[str, object]) -> str:
    """Change a trained checkpoint's inference-only settings (:data:`SAMPLER_FIELDS`: the sampler and the slices per
    forward; the weights do not depend on them) in its stored config.json, keeping every other byte's meaning;
    returns the new version."""
    path = Path(path)
    bad = sorted(set(overrides) - set(SAMPLER_FIELDS))
    if bad:
        raise CheckpointError(f"{bad} are not sampler settings ({', '.join(SAMPLER_FIELDS)}): they need training")
    stored = json.loads((path / "config.json").read_text())
    for key, value in overrides.items():
        *section, name = key.split(".")
        (stored[section[0]] if section else stored)[name] = value
    text = json.dumps(stored, indent=2, sort_keys=True) + "\n"
    MSGLDMConfig.from_dict(stored)  # validates before anything is written
    (path / "config.json").write_text(text)
    return checkpoint_version(path)


if __name__ == "__main__":  # python -m model.checkpoint export SRC DEST | set DIR field=value ...
    import sys

    import yaml

    if len(sys.argv) == 4 and sys.argv[1] == "export":
        print(export_for_serving(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "set":
        print(set_sampler(sys.argv[2], {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}))
    else:
        raise SystemExit("usage: python -m model.checkpoint export SRC DEST | set DIR diffusion.FIELD=VALUE ...")
