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
