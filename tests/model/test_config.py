"""Config: presets load, bad values are named at construction, round trips are exact."""

from __future__ import annotations

import pytest

from model.config import MSGLDMConfig, canonical_modality, load_preset
from model.errors import ConfigError, UnknownModalityError


@pytest.mark.parametrize(
    "preset,mods",
    [
        ("brats", ("t1", "t2", "t1ce", "flair")),
        ("wmh", ("t1", "flair")),
        ("ixi", ("t1", "t2", "pd")),
        ("tiny", ("t1", "t2", "t1ce", "flair")),
    ],
)
def test_presets(preset, mods):
    cfg = load_preset(preset)
    assert cfg.modalities == mods
    assert cfg.latent_size == 24 and cfg.latent_channels == 4 * len(mods)
    assert MSGLDMConfig.from_dict(cfg.to_dict()) == cfg


def test_brats_preset_is_the_decision_record():
    cfg = load_preset("brats")
    assert (cfg.autoencoder.kind, cfg.autoencoder.codebook_size, cfg.autoencoder.channel_mult) == (
        "vq",
        8192,
        (1, 1, 2, 4),
    )
    assert cfg.structure.channels == (32, 64, 128, 256) and cfg.structure.hfib_fusion == "concat"
    assert (cfg.structure.seg_weight, cfg.structure.sc_weight, cfg.structure.sa_weight, cfg.structure.kl_weight) == (
        2.0,
        0.1,
        1.0,
        0.05,
    )
    assert (cfg.unet.base_channels, cfg.unet.channel_mult, cfg.unet.attention_levels) == (128, (1, 1, 2), (1, 2))
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.num_train_timesteps) == (
        0.0015,
        0.0195,
        1000,
    )


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="bogus"):
        MSGLDMConfig.from_dict({"unet": {"bogus": 1}})
    with pytest.raises(ConfigError, match="unet.nope"):
        load_preset("tiny").replace({"unet.nope": 1})


def test_inconsistent_downsampling_is_named():
    with pytest.raises(ConfigError, match="downsamples"):
        load_preset("tiny").replace({"structure.channels": [8, 16, 32]})


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="hfib_fusion"):
        load_preset("tiny").replace({"structure.hfib_fusion": "mul"})
    with pytest.raises(ConfigError, match="clip_percentiles"):
        load_preset("tiny").replace({"preprocess.clip_percentiles": [99, 1]})
    with pytest.raises(UnknownModalityError):
        load_preset("tiny").replace({"modalities": ["t1", "dwi"]})


def test_aliases():
    assert [canonical_modality(m) for m in ("T1N", "t1c", "t2w", "t2f", "FLAIR", "pd")] == [
        "t1",
        "t1ce",
        "t2",
        "flair",
        "flair",
        "pd",
    ]
    with pytest.raises(UnknownModalityError):
        canonical_modality("dwi")
