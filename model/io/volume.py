"""A volume is an array with its geometry: the boundary type between image files and the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Volume:
    """A 3D image in voxel order ``(X, Y, Z)`` with the 4x4 voxel-to-world ``affine`` (NIfTI/RAS+ world).

    ``meta`` carries what the reader knew that geometry does not say (source file, header fields, DICOM
    attributes); the model ignores it and writers may use it.
    """

    data: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"a Volume is 3D, got an array of shape {self.data.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"a Volume needs a finite 4x4 affine, got {self.affine!r}")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]
