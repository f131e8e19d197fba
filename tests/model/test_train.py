"""Training: the slice dataset, the masking sampler, and three stages that train, get interrupted and resume."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import model.train as train_mod
from model.checkpoint import checkpoint_version, load_checkpoint
from model.config import ConfigError
from model.data import find_cases
from model.slices import ModalityMasker, SliceDataset

from .conftest import LPS, MODS, micro_config, synthetic_study


def write_brats2021_case(root: Path, idx: int) -> Path:
    case = f"BraTS2021_{idx:05d}"
    folder = root / case
    folder.mkdir(parents=True)
    study = synthetic_study(LPS, seed=idx)
    for m in MODS:
        nib.save(nib.Nifti1Image(study[m].data, LPS), str(folder / f"{case}_{m}.nii.gz"))
    seg = np.zeros(study["t1"].shape, dtype=np.int16)
    seg[22:28, 18:24, 4:8] = 2
    seg[24:26, 20:22, 5:7] = 4
    nib.save(nib.Nifti1Image(seg, LPS), str(folder / f"{case}_seg.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats2021")
    for i in range(2):
        write_brats2021_case(root, i)
    return root


def test_slice_dataset_items(dataset_root):
    cfg = micro_config()
    ds = SliceDataset(find_cases(dataset_root), cfg)
    item = ds[0]
    assert item["x"].shape == (4, 32, 32) and item["x"].dtype == torch.float32
    assert item["present"].tolist() == [True] * 4
    assert item["seg"].shape == (4, 32, 32) and bool(item["has_seg"])
    seg = ds.seg.float()
    assert seg[:, 1].sum() > 0 and seg[:, 3].sum() > 0  # WT and ET labels made it into slice space
    assert ((seg[:, 3] <= seg[:, 2]) & (seg[:, 2] <= seg[:, 1])).all()  # ET in TC in WT
    assert torch.equal(seg[:, 0].bool(), ~seg[:, 1].bool())
    assert len({cid for cid, _ in ds.origin}) == 2


def test_masker_draws_non_empty_subsets_of_the_present_modalities():
    masker = ModalityMasker(torch.Generator().manual_seed(0))
    present = torch.ones(4000, 4, dtype=torch.bool)
    present[:1000, 1] = False
    avail = masker(present)
    assert (avail.sum(1) >= 1).all() and not (avail & ~present).any()
    counts = torch.bincount(avail[1000:].sum(1), minlength=5)[1:].float() / 3000  # uniform over 1..4
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.04)
    assert not avail[:1000, 1].any()


def _args(preset: Path, data: Path, out: Path, steps: str) -> list[str]:
    return [
        "--preset",
        str(preset),
        "--stage",
        "all",
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        steps,
        "--val-fraction",
        "0.5",
        "--threads",
        "1",
        "--seed",
        "0",
    ]


def test_three_stages_train_get_interrupted_and_resume(tmp_path, dataset_root, monkeypatch):
    preset = tmp_path / "micro.yaml"
    preset.write_text(yaml.safe_dump(json.loads(micro_config().to_json())))
    out = tmp_path / "run"
    calls: list[tuple[int, int]] = []
    save = train_mod._save_stage

    def interrupt(run, stage: int, state: dict) -> None:  # the micro config checkpoints every step
        save(run, stage, state)
        calls.append((stage, state["step"]))
        if (stage, state["step"]) == (2, 2):
            raise KeyboardInterrupt  # killed in the middle of stage 2

    monkeypatch.setattr(train_mod, "_save_stage", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_mod.main(_args(preset, dataset_root, out, "2,2,4"))
    assert calls == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert [torch.load(out / f"stage{k}.pt", weights_only=False)["step"] for k in range(3)] == [2, 2, 2]
    assert not (out / "model").exists()
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 1 and len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])

    calls.clear()
    monkeypatch.setattr(train_mod, "_save_stage",
                        lambda run, stage, state: (save(run, stage, state), calls.append((stage, state["step"]))))
    dest = train_mod.main(_args(preset, dataset_root, out, "2,2,4"))
    assert calls == [(2, 3), (2, 4)]  # stages 0-1 were done; stage 2 resumed at step 2
    assert dest == out / "model"
    model = load_checkpoint(dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["steps"] == {"stage0": 2, "stage1": 2, "stage2": 4}
    assert model.cfg.train_spacing is not None
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["split"]) for r in records} >= {(s, "train") for s in range(3)} | {
        (s, "val") for s in range(3)
    }
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")
    # the stage-2 weights in the export are the EMA ones
    ema = torch.load(out / "stage2.pt", weights_only=False)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.unet.state_dict().items())
    # the trainer's own progress file: every stage finished at its target, one history entry per validation (the
    # interrupted attempt's too), the three gates, the same as in metrics.json
    progress = json.loads((out / "progress.json").read_text())
    assert progress["stages"] == {str(k): {"step": n, "steps": n, "finished": True} for k, n in enumerate((2, 2, 4))}
    vals = [(r["stage"], r["step"]) for r in records if r["split"] == "val"]
    assert [(h["stage"], h["step"]) for h in progress["history"]] == vals
    assert all(h["losses"] and h["val"] and h["epoch"] > 0 for h in progress["history"])
    assert sorted(progress["gates"]) == ["stage0", "stage1", "stage2"] == sorted(metrics["gates"])
    assert {g["name"] for g in progress["gates"].values()} == {
        "autoencoder_brain_psnr", "d_rec_minus_nearest_psnr", "input_dependence_psnr_spread"}


def test_a_failed_gate_stops_the_run_and_ignore_gates_goes_on(tmp_path, dataset_root):
    preset = tmp_path / "micro.yaml"
    preset.write_text(yaml.safe_dump(json.loads(micro_config(**{"train.gates": True}).to_json())))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"gate autoencoder_brain_psnr \(stage 0\) FAILED.*--ignore-gates"):
        train_mod.main(_args(preset, dataset_root, out, "1,1,1"))  # one step: far from 28 dB
    gates = json.loads((out / "progress.json").read_text())["gates"]
    assert list(gates) == ["stage0"] and gates["stage0"]["passed"] is False and gates["stage0"]["value"] < 28
    assert not (out / "stage1.pt").exists()  # nothing spent on stage 1
    dest = train_mod.main([*_args(preset, dataset_root, out, "1,1,1"), "--ignore-gates"])
    metrics = json.loads((dest / "metrics.json").read_text())
    assert sorted(metrics["gates"]) == ["stage0", "stage1", "stage2"] and not metrics["gates"]["stage0"]["passed"]


def test_stage_two_alone_needs_the_earlier_stages(tmp_path, dataset_root):
    preset = tmp_path / "micro.yaml"
    preset.write_text(yaml.safe_dump(json.loads(micro_config().to_json())))
    with pytest.raises(SystemExit, match="stage 0"):
        train_mod.main(
            [
                "--preset",
                str(preset),
                "--stage",
                "2",
                "--data",
                str(dataset_root),
                "--out",
                str(tmp_path / "r"),
                "--max-steps",
                "1",
            ]
        )


def test_fine_tune_from_a_checkpoint_trains_only_the_stages_asked(tmp_path, dataset_root):
    """--init: the base checkpoint's config and weights are the start; stages not trained keep its weights."""
    from model.checkpoint import save_checkpoint
    from model.msgldm import MSGLDM

    torch.manual_seed(1)
    base = save_checkpoint(MSGLDM(micro_config()), tmp_path / "base")
    args = ["--init", str(base), "--stage", "2", "--data", str(dataset_root), "--out", str(tmp_path / "ft"),
            "--max-steps", "1", "--threads", "1", "--seed", "0"]
    dest = train_mod.main(args)
    tuned, start = load_checkpoint(dest), load_checkpoint(base)
    assert tuned.cfg.unet == start.cfg.unet and tuned.cfg.name == start.cfg.name  # the base's config, not --preset's
    for part in ("autoencoder", "structure"):
        before = getattr(start, part).state_dict()
        assert all(torch.equal(v, before[k]) for k, v in getattr(tuned, part).state_dict().items()), part
    before = start.unet.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in tuned.unet.state_dict().items())  # stage 2 trained
    assert not (tmp_path / "ft" / "stage0.pt").exists()


def test_a_repeated_stage_two_reads_its_cache_back_under_a_measured_latent_scale(tmp_path, dataset_root, caplog):
    """Stage 2 from --init twice on the same stages 0-1 (an A/B of stage-2 settings): the second run reads the first
    run's latents and F_s back, although the base's recorded latent scale is not this data's measurement."""
    import logging
    import shutil

    from model.checkpoint import save_checkpoint
    from model.msgldm import MSGLDM

    torch.manual_seed(1)
    base = save_checkpoint(
        MSGLDM(micro_config(**{"diffusion.latent_scale_from_data": True, "train.fs_cache_subsets": 2})),
        tmp_path / "base",
    )

    def run(out: str) -> dict:
        args = ["--init", str(base), "--stage", "2", "--data", str(dataset_root), "--out", str(tmp_path / out),
                "--max-steps", "1", "--threads", "1", "--seed", "0"]
        train_mod.main(args)
        return json.loads((tmp_path / out / "config.json").read_text())["diffusion"]

    first = run("a")
    assert first["latent_scale"] != 1.0  # measured, not the base's
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "stage2_cache.pt", tmp_path / "b" / "stage2_cache.pt")
    with caplog.at_level(logging.INFO, logger="model.train"):
        second = run("b")
    assert any("stage-2 cache read" in r.getMessage() for r in caplog.records)
    assert not any("latent scale measured" in r.getMessage() for r in caplog.records)
    assert second["latent_scale"] == first["latent_scale"]


def test_fine_tune_with_a_changed_latent_retrains_stage0_and_never_serves_a_random_part(tmp_path, dataset_root):
    """--init with --set autoencoder.latent_channels=N: the base's autoencoder and UNet no longer fit, so stages 0
    and 2 start from random weights and must be trained here; a stage-2 run without this run's stage0.pt stops
    instead of serving a random autoencoder; stage 0 then stage 2 gives a checkpoint with the base's structure."""
    from model.checkpoint import save_checkpoint
    from model.msgldm import MSGLDM

    torch.manual_seed(1)
    start_cfg = micro_config()
    base = save_checkpoint(MSGLDM(start_cfg), tmp_path / "base")
    wider = start_cfg.autoencoder.latent_channels * 2
    common = ["--init", str(base), "--data", str(dataset_root), "--out", str(tmp_path / "ft"), "--max-steps", "1",
              "--threads", "1", "--seed", "0", "--ignore-gates", "--set", f"autoencoder.latent_channels={wider}"]
    with pytest.raises(SystemExit, match="stage 0"):
        train_mod.main(["--stage", "2", *common])
    assert train_mod.main(["--stage", "0", *common]) is None  # its UNet is still random: nothing to serve
    assert not (tmp_path / "ft" / "model").exists()
    dest = train_mod.main(["--stage", "2", *common])
    tuned, start = load_checkpoint(dest), load_checkpoint(base)
    assert tuned.cfg.autoencoder.latent_channels == wider
    before = start.structure.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in tuned.structure.state_dict().items())
    stage0 = torch.load(tmp_path / "ft" / "stage0.pt", weights_only=False)["model"]
    assert all(torch.equal(v, stage0[k]) for k, v in tuned.autoencoder.state_dict().items())
    metrics = json.loads((dest / "metrics.json").read_text())  # both invocations' stages, and both gates
    assert metrics["fine_tuned_from"]["stages"] == ["stage0", "stage2"]
    assert metrics["fine_tuned_from"]["version"] == checkpoint_version(base)  # the base's version, not its folder
    assert {"stage0", "stage2"} <= set(metrics["gates"])


def test_decoder_only_fine_tune_keeps_the_latents_and_writes_a_servable_checkpoint(tmp_path, dataset_root):
    """train.stage0_train=decoder from --init: encoder and quant conv frozen (the latents a trained stage 2 sees do
    not move), the decoder trains, and the run writes a checkpoint that records what it was fine-tuned from."""
    from model.checkpoint import save_checkpoint
    from model.msgldm import MSGLDM

    torch.manual_seed(1)
    base = save_checkpoint(MSGLDM(micro_config()), tmp_path / "base", metrics={"steps": {"stage2": 7}})
    args = ["--init", str(base), "--stage", "0", "--data", str(dataset_root), "--out", str(tmp_path / "ft"),
            "--max-steps", "2", "--threads", "1", "--seed", "0", "--ignore-gates", "--set",
            "train.stage0_train=decoder"]
    dest = train_mod.main(args)
    assert dest == tmp_path / "ft" / "model"
    tuned, start = load_checkpoint(dest), load_checkpoint(base)
    before = start.autoencoder.state_dict()
    after = tuned.autoencoder.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    before = start.unet.state_dict()
    assert all(torch.equal(v, before[k]) for k, v in tuned.unet.state_dict().items())
    metrics = json.loads((dest / "metrics.json").read_text())
    assert metrics["fine_tuned_from"]["stages"] == ["stage0"]
    assert metrics["steps"] == {"stage0": 2, "stage1": None, "stage2": 7}
    assert list(metrics["gates"]) == ["stage0"]


def test_ddp_on_cpu_with_two_processes(tmp_path, dataset_root):
    """torchrun with two processes (gloo on CPU): both ranks train, rank 0 writes the checkpoint."""
    import subprocess
    import sys

    preset = tmp_path / "micro.yaml"
    preset.write_text(yaml.safe_dump(json.loads(micro_config().to_json())))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "model.train",
           *_args(preset, dataset_root, out, "1,1,1")]
    result = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == {"stage0": 1, "stage1": 1, "stage2": 1}
    load_checkpoint(out / "model")


def test_stage_two_augmented_views_are_encoded_from_the_changed_images(tmp_path, dataset_root):
    """train.stage2_mirror, stage2_shift and stage2_gamma: rows N + i of the cache are slice i flipped left-right
    *before* encoding (not the flipped latents: the convolutions are not mirror-symmetric), rows 2N + i slice i
    shifted by half a latent cell, rows 3N + i slice i with each modality gamma-remapped, each with F_s fused from
    that view's features on its own subsets; a batch draws every view, and the image term's images are the drawn
    views'."""
    from model.msgldm import MSGLDM

    torch.manual_seed(1)
    cfg = micro_config(**{"train.fs_cache_subsets": 2, "train.stage2_mirror": True, "train.stage2_shift": True,
                          "train.stage2_gamma": 0.4, "diffusion.image_weight": 1.0})
    model = MSGLDM(cfg).eval()
    ds = SliceDataset(find_cases(dataset_root), cfg)
    n = len(ds)
    cache = train_mod.Stage2Cache.build(model, ds, train_mod.Run(tmp_path, torch.device("cpu"), 0, 1), seed=0)
    assert cache.kinds == ["slices", "mirror", "shift", "gamma"]
    assert cache.z.shape[0] == 4 * n and cache.f_s.shape[0] == 4 * n and cache.slices == n and cache.views == 4
    g = cache.gammas
    assert g.shape == (n, 4) and (g >= 1 / 1.4 - 1e-6).all() and (g <= 1.4 + 1e-6).all() and g.std() > 0.05
    i = n // 2
    half = cfg.autoencoder.downsample_factor // 2
    views = {1: ds.x[i : i + 1].flip(-2).float(),
             2: torch.roll(ds.x[i : i + 1].float(), (half, half), (-2, -1)),
             3: train_mod.apply_gamma(ds.x[i : i + 1].float(), g[i : i + 1])}
    with torch.no_grad():
        for view, images in views.items():
            row = view * n + i
            assert torch.allclose(cache.z[row], model.encode_latents(images)[0], atol=1e-4)
            f_s = model.structure.encode_structure(images, cache.subsets[row, 0][None])["f_s"]
            assert torch.allclose(cache.f_s[row, 0].float(), f_s[0], atol=2e-2)
        assert not torch.allclose(cache.z[n + i], cache.z[i].flip(-2), atol=1e-2)
    x = ds.x[i : i + 1].float()
    remapped = train_mod.apply_gamma(x, torch.full((1, 4), 2.0))
    assert torch.equal(remapped[x == -1], x[x == -1]) and remapped.mean() < x.mean()  # background kept, level moved
    gen = torch.Generator().manual_seed(0)
    z0, _, _, rows = cache.batch(torch.zeros(96, dtype=torch.long), gen, ModalityMasker(gen), ds.present[:96])
    drawn = {v for v in range(4) for row in z0 if torch.equal(row, cache.z[v * n])}
    assert drawn == {0, 1, 2, 3}  # slice 0, its mirror, its shift and its gamma view all appear
    assert torch.equal(z0, cache.z[rows])
    # the image term compares each sample's predicted latent with the image of the view it drew
    rows = torch.tensor([i, n + i, 2 * n + i, 3 * n + i])
    shown = cache.images(ds.x[[i] * 4].float(), rows)
    assert torch.equal(shown[0], ds.x[i].float())
    for view, images in views.items():
        assert torch.allclose(shown[view], images[0])
    with pytest.raises(ConfigError, match="stage2_mirror"):
        micro_config(**{"train.stage2_mirror": True, "train.fs_cache_subsets": 0})
    with pytest.raises(ConfigError, match="stage2_gamma"):
        micro_config(**{"train.stage2_gamma": -0.1, "train.fs_cache_subsets": 2})
