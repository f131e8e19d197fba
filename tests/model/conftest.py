"""Shared fixtures of the model tests: one torch thread, tiny configs, synthetic and real studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import MSGLDMConfig, load_preset
from model.io.volume import Volume

DATA = Path(__file__).parents[2].parent / "shared" / "data"
BRATS = DATA / "brats2023_gli_00001_000"
TCGA = DATA / "tcga_du_7294_preprocessed"
BRATS2018 = DATA / "brats2018_deepbrainseg"
MODS = ("t1", "t2", "t1ce", "flair")
RAS = np.array([[1.0, 0, 0, -20], [0, 1, 0, -22], [0, 0, 1, -6], [0, 0, 0, 1]])
LPS = np.array([[-1.0, 0, 0, 20], [0, -1, 0, 22], [0, 0, 1, -6], [0, 0, 0, 1]])

# the smallest config the architecture allows: 32x32 slices, 4x4 latents
MICRO = {
    "name": "micro",
    "preprocess.image_size": 32,
    "autoencoder.base_channels": 8,
    "autoencoder.norm_groups": 4,
    "autoencoder.codebook_size": 64,
    "autoencoder.codebook_update": "ema",
    "autoencoder.disc_layers": 2,
    "autoencoder.disc_channels": 8,
    "autoencoder.disc_start": 0,
    "structure.channels": [4, 8, 16, 32],
    "structure.style_base_channels": 4,
    "structure.decoder_res_blocks": 1,
    "structure.decoder_mlp_channels": 16,
    "structure.dropout": 0.0,
    "unet.base_channels": 16,
    "unet.head_channels": 8,
    "unet.norm_groups": 4,
    "diffusion.default_steps": 3,
    "train.batch_size": 2,
    "train.val_batches": 1,
    "train.log_every": 1,
    "train.val_every": 2,
    "train.ckpt_every": 1,
    "chunk_size_cpu": 4,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def micro_config(**overrides: object) -> MSGLDMConfig:
    return load_preset("tiny").replace({**MICRO, **overrides})


@pytest.fixture
def micro_cfg() -> MSGLDMConfig:
    return micro_config()


def synthetic_study(
    affine: np.ndarray = RAS,
    shape: tuple[int, int, int] = (40, 44, 12),
    seed: int = 0,
    modalities: tuple[str, ...] = MODS,
) -> dict[str, Volume]:
    """An ellipsoid 'brain' with a bright blob, a different contrast per modality, zero background."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 < 1
    blob = ((x - 0.2) ** 2 + (y + 0.1) ** 2 + z**2) < 0.08
    out = {}
    for i, m in enumerate(modalities):
        img = (100 + 40 * i) * brain + (60 - 30 * i) * blob + rng.normal(0, 5, shape) * brain
        out[m] = Volume(
            data=np.where(brain, np.abs(img), 0).astype(np.float32),
            affine=affine.copy(),
            meta={"source": f"synthetic-{m}"},
        )
    return out


def requires_data(path: Path = BRATS):
    return pytest.mark.skipif(not path.is_dir(), reason=f"sample data folder {path} is absent")
