"""Golden orientation tests: LPS- and RAS-stored BraTS volumes, an oblique affine, the real sagittal DICOM series;
flip equivariance (a study stored flipped gives the flipped result, exactly); resampling onto the reference grid and
to the training voxel size and back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import PreprocessConfig
from model.errors import StudyGeometryError
from model.io.geometry import align_to_reference, grid_with_spacing, overlap_fraction, resample
from model.io.nifti import read_nifti
from model.io.volume import Volume
from model.msgldm import MSGLDM
from model.pipeline import Synthesizer
from model.preprocess import prepare_study, restore_volume

from .conftest import BRATS, DATA, MODS, micro_config, requires_data, synthetic_study

SAGITTAL = DATA / "dicom_dcm_qa_decubitus_HFS_t1_fl2d_sag"
CFG = PreprocessConfig(image_size=96)  # larger than the crops below: nothing is cut off


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s, (i, j) = np.cos(np.radians(degrees)), np.sin(np.radians(degrees)), [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def stored_flipped(volume: Volume, axes: tuple[int, ...]) -> Volume:
    """The same image in world space, stored with ``axes`` reversed (as another converter might write it)."""
    flip = np.eye(4)
    for a in axes:
        flip[a, a], flip[a, 3] = -1, volume.shape[a] - 1
    return Volume(np.flip(volume.data, axes).copy(), volume.affine @ flip, dict(volume.meta))


def stored_transposed(volume: Volume, order: tuple[int, int, int]) -> Volume:
    perm = np.eye(4)[list(order) + [3]].T
    return Volume(np.transpose(volume.data, order).copy(), volume.affine @ perm, dict(volume.meta))


@pytest.fixture(scope="module")
def brats_crop() -> dict[str, Volume]:
    """The real BraTS case (LPS-stored), cropped around the brain to keep the tests fast."""
    if not BRATS.is_dir():
        pytest.skip(f"sample data folder {BRATS} is absent")
    names = {"t1": "t1n", "t2": "t2w", "t1ce": "t1c"}
    out = {}
    for m, s in names.items():
        v = read_nifti(BRATS / f"BraTS-GLI-00001-000-{s}.nii.gz")
        crop = np.eye(4)
        crop[:3, 3] = (60, 60, 60)
        out[m] = Volume(v.data[60:140, 60:150, 60:90].copy(), v.affine @ crop, {"source": s})
    assert nib.aff2axcodes(out["t1"].affine) == ("L", "P", "S")
    return out


@requires_data()
def test_lps_and_ras_stored_brats_give_the_same_slices_and_their_own_grids(brats_crop):
    ras = {m: stored_flipped(v, (0, 1)) for m, v in brats_crop.items()}
    assert nib.aff2axcodes(ras["t1"].affine) == ("R", "A", "S")
    a, b = prepare_study(brats_crop, MODS, CFG, align=True), prepare_study(ras, MODS, CFG, align=True)
    assert np.array_equal(a.x, b.x)
    for prep, study in ((a, brats_crop), (b, ras)):
        back = restore_volume(prep.x[:, 0], prep)
        assert np.array_equal(back.affine, study["t1"].affine) and back.shape == study["t1"].shape
        brain = study["t1"].data > 0
        lo, hi = prep.intensity_range["t1"]
        np.testing.assert_allclose(back.data[brain], ((np.clip(study["t1"].data, lo, hi) - lo) / (hi - lo))[brain],
                                   atol=1e-5)


@requires_data()
def test_oblique_affine_round_trips_on_its_own_grid(brats_crop):
    oblique = {m: Volume(v.data, _rotation(2, 17) @ _rotation(0, -9) @ v.affine) for m, v in brats_crop.items()}
    prep = prepare_study(oblique, MODS, CFG, align=True)
    back = restore_volume(prep.x[:, 1], prep)
    assert back.shape == oblique["t2"].shape and np.array_equal(back.affine, oblique["t2"].affine)
    brain = oblique["t2"].data > 0
    assert np.corrcoef(back.data[brain], oblique["t2"].data[brain])[0, 1] > 0.95


@pytest.mark.skipif(not SAGITTAL.is_dir(), reason=f"sample series {SAGITTAL} is absent")
def test_sagittal_series_slices_axially_and_returns_to_its_grid():
    from model.io.dicom import read_series

    t1 = read_series(sorted(SAGITTAL.glob("*.dcm")))
    prep = prepare_study({"t1": t1}, MODS, CFG, align=True)
    assert prep.canonical_shape == (35, 256, 256)  # R-L (the 35 sagittal slices), A-P, S-I
    back = restore_volume(prep.x[:, 0], prep)
    assert back.shape == (256, 256, 35) and np.array_equal(back.affine, t1.affine)
    # with a 1 mm training spacing the 4.8 mm slices are resampled for the model and the result comes back on the grid
    work = prepare_study({"t1": t1}, MODS, CFG, align=True, train_spacing=(1.0, 1.0, 1.0))
    assert work.work_shape == (260, 260, 168) and np.allclose(np.sqrt((work.work_affine[:3, :3] ** 2).sum(0)), 1)
    back = restore_volume(work.x[:, 0], work)
    assert back.shape == t1.shape and np.array_equal(back.affine, t1.affine) and back.data.max() > 0


@pytest.fixture(scope="module")
def micro_synth(tmp_path_factory) -> Synthesizer:
    torch.manual_seed(0)
    ck = save_checkpoint(MSGLDM(micro_config()), tmp_path_factory.mktemp("geom") / "ck")
    return Synthesizer.from_pretrained(ck, device="cpu")


@pytest.mark.parametrize("storage", ["flip-x", "flip-xyz", "transpose"])
def test_a_study_stored_flipped_gives_the_flipped_result(micro_synth, storage):
    torch.set_num_threads(1)
    study = {m: v for m, v in synthetic_study(shape=(36, 40, 8)).items() if m != "flair"}
    if storage == "transpose":
        other = {m: stored_transposed(v, (1, 0, 2)) for m, v in study.items()}
        undo = lambda a: np.transpose(a, (1, 0, 2))  # noqa: E731
    else:
        axes = (0,) if storage == "flip-x" else (0, 1, 2)
        other = {m: stored_flipped(v, axes) for m, v in study.items()}
        undo = lambda a: np.flip(a, axes)  # noqa: E731
    a = micro_synth.synthesize(study, ["flair"], steps=1, seed=3).volumes["flair"]
    b = micro_synth.synthesize(other, ["flair"], steps=1, seed=3).volumes["flair"]
    assert np.array_equal(b.affine, other["t1"].affine)
    np.testing.assert_allclose(undo(b.data), a.data, atol=1e-5)
    assert a.data.max() > 0


def test_resampling_follows_the_affines_exactly():
    """A volume holding its own world x + 2y - z coordinate, resampled (trilinear: exact for a linear field) onto a
    rotated, coarser grid, holds the target voxels' world coordinates: no flip, no half-voxel shift."""
    source_affine = np.array([[-1.0, 0, 0, 40], [0, -1.0, 0, 44], [0, 0, 2.0, -10], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (40, 44, 20)), indexing="ij"), axis=-1)
    world = ijk @ source_affine[:3, :3].T + source_affine[:3, 3]
    field = world @ np.array([1.0, 2.0, -1.0])
    target_affine = _rotation(2, 10) @ np.array([[0, 1.5, 0, -10], [1.5, 0, 0, 0], [0, 0, 1.5, 5], [0, 0, 0, 1]])
    out = resample(Volume(field.astype(np.float32), source_affine), (16, 16, 12), target_affine, fill=np.nan)
    t_ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (16, 16, 12)), indexing="ij"), axis=-1)
    expected = (t_ijk @ target_affine[:3, :3].T + target_affine[:3, 3]) @ np.array([1.0, 2.0, -1.0])
    inside = np.isfinite(out.data)
    assert inside.mean() > 0.3
    np.testing.assert_allclose(out.data[inside], expected[inside], atol=1e-3)


def test_inputs_on_other_grids_in_one_space_are_resampled_onto_the_reference():
    study = synthetic_study(shape=(40, 44, 12))
    t2 = study["t2"]
    shape, affine = grid_with_spacing(t2.shape, t2.affine, (2.0, 2.0, 2.0))
    assert shape == (20, 22, 6)
    coarse = resample(t2, shape, affine)
    aligned, resampled = align_to_reference({"t1": study["t1"], "t2": coarse})
    assert resampled == ["t2"] and aligned["t2"].shape == study["t1"].shape
    assert np.array_equal(aligned["t2"].affine, study["t1"].affine)
    prep = prepare_study({"t1": study["t1"], "t2": coarse}, MODS, CFG, align=True)
    assert prep.resampled == ("t2",)
    with pytest.raises(StudyGeometryError):  # training/evaluation keep the strict one-grid rule
        prepare_study({"t1": study["t1"], "t2": coarse}, MODS, CFG)


def test_inputs_in_another_space_are_refused():
    study = synthetic_study()
    far = study["t2"].affine.copy()
    far[:3, 3] += 300
    assert overlap_fraction(study["t1"].shape, study["t1"].affine, study["t2"].shape, far) == 0
    with pytest.raises(StudyGeometryError, match="overlaps t1 by 0%"):
        align_to_reference({"t1": study["t1"], "t2": Volume(study["t2"].data, far)})
    a = Volume(study["t1"].data, study["t1"].affine, {"frame_of_reference_uid": "1.2.3"})
    b = Volume(study["t2"].data, study["t2"].affine, {"frame_of_reference_uid": "1.2.4"})
    with pytest.raises(StudyGeometryError, match="frame of reference"):
        align_to_reference({"t1": a, "t2": b})
