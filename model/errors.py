"""Named errors of the model package: each subclasses a builtin and names the offending value."""

from __future__ import annotations


class ConfigError(ValueError):
    """A model/training configuration with invalid or inconsistent values."""


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not match its config."""


class UnknownModalityError(ValueError):
    """A modality name the model was not built for."""


class StudyGeometryError(ValueError):
    """Input volumes of one study that do not share one voxel grid (shape and affine)."""


class NoInputError(ValueError):
    """A synthesis request without any available input modality."""


class TargetError(ValueError):
    """A synthesis target that cannot be produced (none given, or given as an input too)."""


class EmptyBrainError(ValueError):
    """Input volumes with no voxel above background: there is no brain to work on."""


class EvaluationError(ValueError):
    """Bad evaluation arguments or inputs (no cases, unknown targets, missing checkpoint...)."""


class PreprocessError(ValueError):
    """A raw study that the preprocessing chain (model/native.py) cannot bring into the model's space; ``series``
    names the offending series."""

    def __init__(self, message: str, series: str = "") -> None:
        super().__init__(message)
        self.series = series


class BrainExtractionError(PreprocessError):
    """No plausible brain mask for the reference series (not a head, a localizer, an empty image)."""


class RegistrationError(PreprocessError):
    """A series that cannot be registered to the reference (or the reference to the atlas) plausibly."""
