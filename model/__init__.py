"""MSG-LDM: multiscale structure-guided latent diffusion for missing brain-MRI sequence synthesis.

Pure PyTorch package (no service code). Public API::

    from model import Synthesizer, load_preset, init_checkpoint
    synth = Synthesizer.from_pretrained("model/default")
    result = synth.synthesize({"t1": t1, "t2": t2}, ["flair"])

Heavy modules are imported lazily, so ``import model`` alone does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MSGLDM",
    "MSGLDMConfig",
    "PreparedStudy",
    "SynthesisResult",
    "Synthesizer",
    "init_checkpoint",
    "load_checkpoint",
    "load_preset",
    "prepare_study",
    "restore_volume",
    "save_checkpoint",
]

_LAZY = {
    "MSGLDM": "model.msgldm",
    "MSGLDMConfig": "model.config",
    "load_preset": "model.config",
    "PreparedStudy": "model.preprocess",
    "prepare_study": "model.preprocess",
    "restore_volume": "model.preprocess",
    "SynthesisResult": "model.pipeline",
    "Synthesizer": "model.pipeline",
    "init_checkpoint": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
