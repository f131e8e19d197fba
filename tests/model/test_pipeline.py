"""The service's entry point: reference grid, seeds, progress and cancellation, errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.errors import StudyGeometryError, TargetError, UnknownModalityError
from model.io.volume import Volume
from model.msgldm import MSGLDM
from model.pipeline import Synthesizer, stage_dtypes

from .conftest import LPS, micro_config, synthetic_study


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MSGLDM(micro_config())
    with torch.no_grad():  # a non-trivial denoiser, so samples depend on the seed
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "micro")


@pytest.fixture(scope="module")
def synth(checkpoint):
    torch.set_num_threads(1)
    return Synthesizer.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def study():
    full = synthetic_study(LPS, shape=(40, 44, 10))
    return {"t1": full["t1"], "t2": full["t2"]}


def test_attributes(synth):
    assert synth.modalities == ("t1", "t2", "t1ce", "flair")
    assert synth.default_steps == 3 and synth.version.startswith("msgldm-micro-")
    assert synth.device.type == "cpu" and synth.chunk_size == 4


def test_returns_the_reference_grid_and_unit_range(synth, study):
    res = synth.synthesize(study, ["flair", "t1c"], steps=2, seed=0)
    assert set(res.volumes) == {"flair", "t1ce"} and res.uncertainty is None
    brain = study["t1"].data > 0
    for vol in res.volumes.values():
        assert vol.shape == (40, 44, 10) and np.array_equal(vol.affine, LPS)
        assert vol.data.dtype == np.float32 and vol.data.min() >= 0 and vol.data.max() <= 1
        assert (vol.data[~brain] == 0).all() and vol.data[brain].std() > 0
    assert set(res.timings) == {"preprocess", "encode", "denoise", "decode", "postprocess", "total"}
    assert res.meta["available"] == ["t1", "t2"] and res.meta["reference"] == "t1" and res.meta["steps"] == 2


def test_seed_makes_it_deterministic(synth, study):
    a = synth.synthesize(study, ["flair"], steps=2, seed=5).volumes["flair"].data
    b = synth.synthesize(study, ["flair"], steps=2, seed=5).volumes["flair"].data
    c = synth.synthesize(study, ["flair"], steps=2, seed=6).volumes["flair"].data
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_chunk_size_does_not_change_the_output(checkpoint, synth, study):
    other = Synthesizer.from_pretrained(checkpoint, device="cpu", chunk_size=3)
    a = synth.synthesize(study, ["flair"], steps=2, seed=1).volumes["flair"].data
    b = other.synthesize(study, ["flair"], steps=2, seed=1).volumes["flair"].data
    assert np.allclose(a, b, atol=1e-5)


def test_a_checkpoint_conditioned_on_the_known_latents_synthesizes_from_them(tmp_path, study):
    """diffusion.condition_known through the service's entry point: the pipeline encodes the known latents for the
    UNet's condition even with replace_known off (the sampler refuses to run without them), chunking aside."""
    torch.manual_seed(0)
    model = MSGLDM(micro_config(**{"diffusion.condition_known": True}))
    with torch.no_grad():
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    ckpt = save_checkpoint(model, tmp_path / "ck")
    synth = Synthesizer.from_pretrained(ckpt, device="cpu")
    out = synth.synthesize(study, ["flair"], steps=2, seed=0, replace_known=False).volumes["flair"].data
    again = Synthesizer.from_pretrained(ckpt, device="cpu", chunk_size=3)
    assert np.allclose(again.synthesize(study, ["flair"], steps=2, seed=0, replace_known=False)
                       .volumes["flair"].data, out, atol=1e-5)
    assert out[study["t1"].data > 0].std() > 0


def test_progress_reports_every_phase_and_step(synth, study):
    calls: list[tuple[str, float]] = []
    synth.synthesize(study, ["flair"], steps=3, samples=2, progress=lambda p, f: calls.append((p, f)))
    phases = [p for p, _ in calls]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "preprocess",
        "encode",
        "denoise",
        "decode",
        "postprocess",
    ]
    assert phases.count("denoise") == 1 + 3 * 2  # phase start + every step of both samples
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0


def test_an_exception_in_progress_stops_the_synthesis(synth, study):
    calls: list[tuple[str, float]] = []

    class Cancelled(Exception):
        pass

    def progress(phase: str, fraction: float) -> None:
        calls.append((phase, fraction))
        if phase == "denoise" and len([c for c in calls if c[0] == "denoise"]) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        synth.synthesize(study, ["flair"], steps=5, progress=progress)
    assert calls[-1][0] == "denoise" and not any(p in ("decode", "postprocess") for p, _ in calls)


def test_samples_give_an_uncertainty_map(synth, study):
    res = synth.synthesize(study, ["t1ce"], steps=2, samples=3, seed=0)
    std = res.uncertainty["t1ce"]
    assert std.shape == (40, 44, 10) and np.array_equal(std.affine, LPS)
    assert std.data.max() > 0 and (std.data[study["t1"].data == 0] == 0).all()


def test_errors(synth, study):
    with pytest.raises(UnknownModalityError):
        synth.synthesize(study, ["dwi"])
    with pytest.raises(UnknownModalityError):
        synth.synthesize({**study, "pd": study["t1"]}, ["flair"])
    with pytest.raises(TargetError, match="also an input"):
        synth.synthesize(study, ["t1"])
    with pytest.raises(TargetError):
        synth.synthesize(study, [])
    elsewhere = LPS.copy()
    elsewhere[:3, 3] += 500.0  # no overlap with the reference: not one physical space
    bad = Volume(study["t2"].data[:, :-1], elsewhere)
    with pytest.raises(StudyGeometryError, match="overlaps"):
        synth.synthesize({"t1": study["t1"], "t2": bad}, ["flair"])
    assert issubclass(TargetError, ValueError) and issubclass(StudyGeometryError, ValueError)


def test_segment_returns_region_probabilities_on_the_grid(synth, study):
    seg = synth.segment(study)
    assert set(seg) == {"WT", "TC", "ET"}
    assert all(v.shape == (40, 44, 10) and v.data.min() >= 0 and v.data.max() <= 1 for v in seg.values())


def test_autoencode_decodes_each_volume_from_its_own_latent(synth, study):
    """The evaluation's autoencoder ceiling: every given volume through the (shared) autoencoder, on the grid in
    [0, 1]; swapping two volumes swaps the outputs (each comes from its own latent, not a neighbour's)."""
    out = synth.autoencode(study)
    assert set(out) == {"t1", "t2"}
    assert all(v.shape == (40, 44, 10) and v.data.min() >= 0 and v.data.max() <= 1 for v in out.values())
    assert not np.allclose(out["t1"].data, out["t2"].data, atol=1e-3)
    swapped = synth.autoencode({"t1": study["t2"], "t2": study["t1"]})
    np.testing.assert_allclose(swapped["t1"].data, out["t2"].data, atol=1e-5)
    np.testing.assert_allclose(swapped["t2"].data, out["t1"].data, atol=1e-5)


def test_cli(tmp_path, checkpoint, study, capsys):
    from model.synthesize import main

    paths = []
    for m, vol in study.items():
        paths.append(f"{m}={tmp_path / f'{m}.nii.gz'}")
        nib.save(nib.Nifti1Image(vol.data, vol.affine), str(tmp_path / f"{m}.nii.gz"))
    args = [
        "--checkpoint",
        str(checkpoint),
        *[a for p in paths for a in ("--input", p)],
        "--target",
        "flair",
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--samples",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    img = nib.load(str(tmp_path / "out" / "flair.nii.gz"))
    assert img.shape == (40, 44, 10) and np.allclose(img.affine, LPS)
    assert (tmp_path / "out" / "flair_std.nii.gz").is_file() and summary["steps"] == 2


def test_resamples_to_the_training_voxel_size_and_back(tmp_path, study):
    torch.manual_seed(0)
    cfg = micro_config(train_spacing=[1.0, 1.0, 1.0])
    synth = Synthesizer.from_pretrained(save_checkpoint(MSGLDM(cfg), tmp_path / "ck"), device="cpu")
    same = synth.synthesize(study, ["flair"], steps=1)
    assert same.meta["warnings"] == [] and same.meta["work_grid"] is None
    coarse_affine = LPS @ np.diag([1.0, 1.0, 2.0, 1.0])
    coarse = {m: Volume(v.data, coarse_affine) for m, v in study.items()}
    result = synth.synthesize(coarse, ["flair"], steps=1)
    assert "resampled" in result.meta["warnings"][0]
    assert result.meta["work_grid"]["shape"][2] == 2 * study["t1"].shape[2]  # 2 mm slices -> 1 mm
    flair = result.volumes["flair"]
    assert flair.shape == study["t1"].shape and np.array_equal(flair.affine, coarse_affine)
    assert flair.data.max() > 0 and (flair.data[study["t1"].data == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_grid(checkpoint, study):
    synth = Synthesizer.from_pretrained(checkpoint)
    assert synth.device.type == "cuda"
    res = synth.synthesize(study, ["flair"], steps=2, samples=2)
    assert res.volumes["flair"].shape == (40, 44, 10) and res.uncertainty is not None


SAMPLE = Path(__file__).parents[2] / "samples" / "tcga-du-7294" / "TCGA-DU-7294"


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 support")
@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_bf16_agrees_with_fp32(precision, tmp_path):
    """The trained default model on real slices: bf16 stages change the output by < -40 dB of its range (one
    test-time view: the precision is under test, not the views)."""
    import shutil

    from model.checkpoint import set_sampler
    from model.io.nifti import read_nifti

    study = {}
    for m, suffix in (("t1", "t1"), ("t1ce", "t1c"), ("t2", "t2")):
        v = read_nifti(f"{SAMPLE}_{suffix}.nii.gz")
        study[m] = Volume(data=v.data[..., 64:72], affine=v.affine, meta=v.meta)
    checkpoint = tmp_path / "default"
    shutil.copytree(Path(__file__).parents[2] / "model" / "default", checkpoint)
    set_sampler(checkpoint, {"diffusion.test_time_views": 1})
    ref = Synthesizer.from_pretrained(checkpoint, device="cpu", precision="fp32")
    low = Synthesizer.from_pretrained(checkpoint, device="cpu", precision=precision)
    a = ref.synthesize(study, ["flair"], steps=5, seed=0)
    b = low.synthesize(study, ["flair"], steps=5, seed=0)
    assert set(a.meta["precision"].values()) == {"float32"} and "bfloat16" in b.meta["precision"].values()
    brain = study["t1"].data > 0
    x, y = a.volumes["flair"].data[brain], b.volumes["flair"].data[brain]
    assert x.std() > 0.05  # a real image, not a constant
    psnr = 10 * np.log10(1.0 / np.mean((x - y) ** 2))
    assert psnr > 40.0, psnr


def test_stage_precisions():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert set(stage_dtypes("fp32", cuda).values()) == {torch.float32}
    assert set(stage_dtypes("auto", cuda).values()) == set(stage_dtypes("bf16", cpu).values()) == {torch.bfloat16}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert stage_dtypes("auto", cpu) == {"encode": torch.bfloat16, "denoise": torch.float32,
                                             "decode": torch.bfloat16}
    with pytest.raises(ValueError, match="precision"):
        stage_dtypes("fp16", cpu)


def test_view_forward_and_back_are_inverse():
    from model.slices import test_time_views, view_back, view_forward

    x = torch.randn(2, 3, 16, 16)
    views = test_time_views(4, 4)
    assert views[0] == (False, 0) and len(set(views)) == 4  # the slices themselves first, four different views
    for view in views:
        assert torch.equal(view_back(view_forward(x, view), view), x)
        assert view == (False, 0) or not torch.equal(view_forward(x, view), x)
    assert torch.equal(view_forward(x, (True, 0)), x.flip(-2))  # H is left-right (RAS x)
    assert test_time_views(1, 4) == [(False, 0)]  # the paper: the slices alone
    with pytest.raises(ValueError):
        test_time_views(3, 4)


@pytest.mark.parametrize("axis", [0])  # RAS x: the slices' H, left-right
def test_mirror_views_make_the_synthesis_mirror_equivariant(tmp_path, study, axis):
    """diffusion.test_time_views = 2 averages the slices and their mirror (mapped back): the synthesis of a mirrored
    study is then the mirrored synthesis, which the micro model alone is not (a view not mapped back breaks it)."""
    def run(views: int, mirrored: bool) -> np.ndarray:
        torch.manual_seed(0)
        model = MSGLDM(micro_config(**{"diffusion.test_time_views": views}))
        with torch.no_grad():
            torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
        synth = Synthesizer.from_pretrained(save_checkpoint(model, tmp_path / f"v{views}"), device="cpu")
        given = {m: Volume(np.flip(v.data, axis).copy() if mirrored else v.data, v.affine, v.meta)
                 for m, v in study.items()}
        out = synth.synthesize(given, ["flair"], steps=2, seed=0).volumes["flair"].data
        return np.flip(out, axis) if mirrored else out

    assert np.allclose(run(2, False), run(2, True), atol=1e-5)
    assert not np.allclose(run(1, False), run(1, True), atol=1e-3)
