"""What the API knows of the serving model without loading it: its checkpoint config (``model.config``, no torch)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from api.core.settings import get_settings
from model.config import read_config
from model.errors import CheckpointError


class ModelUnavailable(RuntimeError):
    """The serving checkpoint is missing or unreadable."""


@lru_cache
def serving_modalities(checkpoint: Path | None = None) -> tuple[str, ...]:
    """The ordered modality names of the serving model."""
    path = checkpoint or get_settings().inference.checkpoint
    try:
        return tuple(read_config(path).modalities)
    except CheckpointError as exc:
        raise ModelUnavailable(f"cannot read the serving model's config: {exc}") from exc
