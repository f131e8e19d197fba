"""Checkpoint directories: round trip, content-hash versions, random init, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import checkpoint_version, init_checkpoint, load_checkpoint, save_checkpoint
from model.config import load_preset
from model.errors import CheckpointError, ConfigError
from model.msgldm import MSGLDM

from .conftest import micro_config


def test_round_trip_gives_identical_outputs(tmp_path, micro_cfg):
    torch.manual_seed(0)
    model = MSGLDM(micro_cfg).eval()
    ema = {k: v + 0.01 for k, v in model.unet.state_dict().items()}
    save_checkpoint(model, tmp_path / "ck", metrics={"psnr": 1.0}, unet_state=ema)
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {
        "config.json",
        "metrics.json",
        "autoencoder.safetensors",
        "structure.safetensors",
        "unet.safetensors",
    }
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == micro_cfg
    assert json.loads((tmp_path / "ck" / "metrics.json").read_text()) == {"psnr": 1.0}
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(v, ema[k])  # the EMA weights are what inference uses
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(model.condition(x, avail), loaded.condition(x, avail))
        assert torch.equal(model.encode_latents(x), loaded.encode_latents(x))


def test_version_is_a_content_hash(tmp_path, micro_cfg):
    torch.manual_seed(0)
    model = MSGLDM(micro_cfg)
    save_checkpoint(model, tmp_path / "a")
    save_checkpoint(model, tmp_path / "b")
    va = checkpoint_version(tmp_path / "a")
    assert (
        va == checkpoint_version(tmp_path / "b")
        and va.startswith("msgldm-micro-")
        and len(va) == len("msgldm-micro-") + 12
    )
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] += 1.0
    save_checkpoint(model, tmp_path / "c")
    assert checkpoint_version(tmp_path / "c") != va


def test_a_config_field_added_later_keeps_existing_versions(tmp_path, micro_cfg, monkeypatch):
    """The version hashes config.json as stored: once code adds a field (at its default), re-serialising an old
    checkpoint's config would differ, yet its version must stay (the registry and docs name versions)."""
    from model.config import MSGLDMConfig

    save_checkpoint(MSGLDM(micro_cfg), tmp_path / "a")
    before = checkpoint_version(tmp_path / "a")
    to_json = MSGLDMConfig.to_json
    monkeypatch.setattr(MSGLDMConfig, "to_json", lambda self: to_json(self)[:-1] + ', "added_later": 0}')
    assert checkpoint_version(tmp_path / "a") == before


def test_init_checkpoint_is_complete_and_deterministic(tmp_path):
    a = init_checkpoint("tiny", tmp_path / "a", seed=3)
    b = init_checkpoint("tiny", tmp_path / "b", seed=3)
    assert checkpoint_version(a) == checkpoint_version(b)
    model = load_checkpoint(a)
    assert model.cfg == load_preset("tiny")
    assert json.loads((a / "metrics.json").read_text())["trained"] is False
    assert sum(f.stat().st_size for f in a.iterdir()) < 30e6


def test_broken_checkpoints_raise_named_errors(tmp_path, micro_cfg):
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(MSGLDM(micro_cfg), tmp_path / "ck")
    (tmp_path / "ck" / "unet.safetensors").unlink()
    with pytest.raises(CheckpointError, match="unet.safetensors"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(MSGLDM(micro_cfg), tmp_path / "ck2")
    cfg = json.loads((tmp_path / "ck2" / "config.json").read_text())
    cfg["unet"]["base_channels"] = 32
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "ck2")


DEFAULT = Path(__file__).parents[2] / "model" / "default"


@pytest.mark.skipif(not (DEFAULT / "config.json").is_file(), reason="model/default has no checkpoint")
def test_the_shipped_default_model_loads_fits_the_size_budget_and_records_its_split_and_gates():
    model = load_checkpoint(DEFAULT)
    assert model.cfg.modalities == ("t1", "t2", "t1ce", "flair") and model.cfg.name == "cpu"
    assert checkpoint_version(DEFAULT) == "msgldm-cpu-03be484829bd"  # as README, docs/quality.md and TRAINING.md say
    metrics = json.loads((DEFAULT / "metrics.json").read_text())
    assert metrics["trained"] is True and sorted(metrics["gates"]) == ["stage0", "stage1", "stage2"]
    split = metrics["split"]  # the held-out test cases were never trained on
    assert {"BraTS-GLI-00001-000", "TCGA-DU-7294"} <= set(split["test"]) and len(split["test"]) >= 4
    assert not set(split["test"]) & set(split["train"]) and not set(split["val"]) & set(split["train"])
    text = "".join(f.read_text() for f in DEFAULT.glob("*.json")) + (DEFAULT / "TRAINING.md").read_text()
    assert "/work/" not in text and "/home/" not in text  # no absolute development paths
    assert not (DEFAULT / "training").exists()
    assert sum(f.stat().st_size for f in DEFAULT.rglob("*") if f.is_file()) <= 30 * 2**20


def test_serving_export_is_compact_and_synthesizes_like_the_original(tmp_path):
    """float16 weights without D_rec and the style encoders: same structure condition and samples within fp16 error."""
    from model.checkpoint import TRAINING_ONLY, export_for_serving

    torch.manual_seed(0)
    model = MSGLDM(micro_config())
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    full = save_checkpoint(model, tmp_path / "full")
    small = export_for_serving(full, tmp_path / "small")
    size = {d: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (full, small)}
    assert size[small] < 0.5 * size[full]
    a, b = load_checkpoint(full), load_checkpoint(small)
    assert all(p.dtype == torch.float32 for p in b.parameters())
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    avail = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        fa, fb = a.condition(x, avail), b.condition(x, avail)
        assert (fa - fb).abs().max() < 1e-2 * fa.abs().max()
        sa, sb = a.sample(x, avail, 3, seed=0), b.sample(x, avail, 3, seed=0)
    assert (sa - sb).abs().max() < 0.05
    # a structure file that lacks only some of the training-only parts, or anything else, is refused
    from safetensors.torch import load_file, save_file

    state = load_file(str(full / "structure.safetensors"))
    partial = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY[0])}
    save_file(partial, str(small / "structure.safetensors"))
    with pytest.raises(CheckpointError, match="missing or unexpected"):
        load_checkpoint(small)


def test_set_sampler_changes_only_sampler_settings(tmp_path):
    from model.checkpoint import set_sampler

    torch.manual_seed(0)
    path = save_checkpoint(MSGLDM(micro_config()), tmp_path / "micro")
    before, version = json.loads((path / "config.json").read_text()), checkpoint_version(path)
    new = set_sampler(path, {"diffusion.default_steps": 2, "diffusion.test_time_views": 4})
    after = json.loads((path / "config.json").read_text())
    assert new != version and new == checkpoint_version(path)
    assert after["diffusion"].pop("test_time_views") == 4 and after["diffusion"].pop("default_steps") == 2
    before["diffusion"].pop("test_time_views")
    before["diffusion"].pop("default_steps")
    assert after == before  # nothing else moved
    cfg = load_checkpoint(path).cfg
    assert cfg.diffusion.test_time_views == 4 and cfg.diffusion.default_steps == 2
    with pytest.raises(CheckpointError, match="need training"):
        set_sampler(path, {"unet.base_channels": 8})
    with pytest.raises(ConfigError):
        set_sampler(path, {"diffusion.test_time_views": 3})
    assert checkpoint_version(path) == new  # refused changes write nothing
    top = set_sampler(path, {"chunk_size_cpu": 3})  # slices per forward: top-level, inference only
    assert load_checkpoint(path).cfg.chunk_size_cpu == 3 and top != new
