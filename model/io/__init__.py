"""Image I/O at the model's edge: numpy arrays with their affine, no torch."""

from model.io.volume import Volume

__all__ = ["Volume"]
