"""The gates between training stages: the slice-level nearest-modality baseline they compare against, and the
stage-2 gate's z0 estimate for each prediction type."""

from __future__ import annotations

import pytest
import torch

from model.gates import SliceNearest, _z0_estimate
from model.msgldm import MSGLDM

from .conftest import micro_config


class _Slices:
    """The two attributes of a SliceDataset the gates read."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)


def _phantom(n: int, seed: int) -> torch.Tensor:
    """Slices where modality 1 is a monotone function of modality 0, modality 2 is unrelated noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    brain = (xx**2 + yy**2) < 0.7
    base = torch.rand(n, 32, 32, generator=g)
    m0 = base
    m1 = base**2  # same structure, another contrast
    m2 = torch.rand(n, 32, 32, generator=g)
    x = torch.stack([m0, m1, m2], 1) * 1.8 - 0.9
    return torch.where(brain, x, torch.tensor(-1.0))


def test_slice_nearest_copies_the_correlated_modality_with_the_targets_histogram():
    train, val = _Slices(_phantom(40, 0)), _phantom(6, 1)
    nearest = SliceNearest(train)
    assert nearest.source(1, [0, 2]) == 0 and nearest.source(0, [1, 2]) == 1
    pred = nearest.predict(val, 1, [0, 2])
    brain = val[:, 0] > -1
    err_matched = (pred - val[:, 1])[brain].abs().mean()
    err_copy = (val[:, 0] - val[:, 1])[brain].abs().mean()
    assert err_matched < 0.05 < err_copy  # histogram matching turns the copy into the target's contrast
    assert (pred[~brain] == -1).all()


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
def test_z0_estimate_inverts_each_training_target(prediction):
    model = MSGLDM(micro_config(**{"diffusion.prediction": prediction}))
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    t = torch.full((2,), 700)
    z_t = model.scheduler.add_noise(z0, eps, t)
    target = model.scheduler.target(z0, eps, t)  # a perfect network's output
    assert torch.allclose(_z0_estimate(model, target, z_t, 700), z0, atol=1e-4)
