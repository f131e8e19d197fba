"""What the API knows of the serving model without loading it: the checkpoint's config.json."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from api.core.settings import get_settings


class ModelUnavailable(RuntimeError):
    """The serving checkpoint is missing or unreadable."""


@lru_cache
def serving_modalities(checkpoint: Path | None = None) -> tuple[str, ...]:
    """The ordered modality names of the serving model."""
    path = (checkpoint or get_settings().inference.checkpoint) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read the serving model's config at {path}: {exc}") from exc
    modalities = config.get("modalities")
    if not modalities:
        raise ModelUnavailable(f"{path} names no modalities")
    return tuple(modalities)
