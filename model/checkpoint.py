"""Inference checkpoints as directories (diffusers style): everything to rebuild the model, nothing else.

``config.json``          the full :class:`~model.config.MSGLDMConfig` (modalities, preprocessing, sampler defaults)
``autoencoder.safetensors``, ``structure.safetensors``, ``unet.safetensors`` (the UNet's EMA weights)
``metrics.json``         training/evaluation record (may be ``{}``)

The version is a content hash of config.json and the weight files: ``msgldm-<name>-<12 hex>``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import MSGLDMConfig, load_preset
from model.errors import CheckpointError
from model.msgldm import MSGLDM

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


def read_config(path: str | Path) -> MSGLDMConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: no config.json")
    try:
        return MSGLDMConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid config.json in {path}: {exc}") from exc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> MSGLDM:
    """Rebuild the model from a checkpoint directory, in eval mode on ``device``."""
    path = Path(path)
    cfg = read_config(path)
    model = MSGLDM(cfg)
    for part, name in WEIGHT_FILES.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}")
        try:
            getattr(model, part).load_state_dict(load_file(str(f)), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{f} does not match config.json: {exc}") from exc
    return model.to(device).eval()


def checkpoint_version(path: str | Path) -> str:
    """``msgldm-<name>-<sha256[:12]>`` over config.json and the weights' names, dtypes, shapes and values
    (tensor content, not file bytes: safetensors' header order is not stable between writes)."""
    path = Path(path)
    h = hashlib.sha256()
    cfg = read_config(path)
    h.update(cfg.to_json().encode())
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
