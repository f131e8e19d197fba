"""Volume <-> slices: exact grid round trip for RAS- and LPS-stored inputs, masks, intensity, errors."""

from __future__ import annotations

import numpy as np
import pytest

from model.config import PreprocessConfig
from model.errors import NoInputError, StudyGeometryError, UnknownModalityError
from model.io.volume import Volume
from model.preprocess import prepare_study, restore_volume

from .conftest import BRATS, LPS, MODS, RAS, requires_data, synthetic_study

CFG = PreprocessConfig(image_size=32)
OBLIQUE_PERMUTED = np.array([[0, 0, 1.2, -10], [-1.0, 0, 0, 30], [0, 1.0, 0, -8], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [RAS, LPS, OBLIQUE_PERMUTED], ids=["ras", "lps", "permuted"])
def test_prepare_then_restore_returns_the_input_grid(affine):
    study = synthetic_study(affine)
    prep = prepare_study(study, MODS, CFG)
    assert prep.x.shape[1:] == (4, 32, 32) and prep.x.dtype == np.float32
    assert prep.x.min() >= -1 and prep.x.max() <= 1
    for j, m in enumerate(MODS):
        vol = restore_volume(prep.x[:, j], prep)
        assert vol.shape == study[m].shape
        assert np.array_equal(vol.affine, study[m].affine)
        brain = study[m].data > 0
        # values come back in place: the restored [0, 1] image is the clipped, rescaled input
        lo, hi = prep.intensity_range[m]
        expected = (np.clip(study[m].data, lo, hi) - lo) / (hi - lo)
        assert np.allclose(vol.data[brain], expected[brain], atol=1e-5)
        assert (vol.data[~brain] == 0).all()
        assert vol.data.dtype == np.float32


def test_slices_do_not_depend_on_the_storage_order():
    """The same world-space image stored LPS (x, y flipped) or RAS gives identical slices."""
    lps_study = synthetic_study(LPS)
    ras_affine = LPS @ np.array([[-1.0, 0, 0, 39], [0, -1, 0, 43], [0, 0, 1, 0], [0, 0, 0, 1]])
    ras_study = {m: Volume(v.data[::-1, ::-1].copy(), ras_affine) for m, v in lps_study.items()}
    assert np.allclose(ras_affine[:3, :3], np.eye(3))
    a, b = prepare_study(lps_study, MODS, CFG), prepare_study(ras_study, MODS, CFG)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.slice_indices, b.slice_indices)


def test_absent_modalities_are_minus_one_and_mask_is_the_union_of_available():
    study = synthetic_study()
    t2 = study["t2"].data.copy()
    t2[:20] = 0  # t2 covers only part of the brain: the union with flair still covers it all
    prep = prepare_study({"t2": Volume(t2, RAS), "flair": study["flair"]}, MODS, CFG)
    assert prep.available == (False, True, False, True)
    assert (prep.x[:, 0] == -1).all() and (prep.x[:, 2] == -1).all()
    assert prep.reference == "t2"
    full = prepare_study(study, MODS, CFG)
    assert prep.mask.sum() == full.mask.sum()


def test_restore_pastes_back_when_the_window_pads_and_crops():
    study = synthetic_study(shape=(60, 20, 5))  # wider than 32 in x (crop), narrower in y (pad)
    prep = prepare_study(study, MODS, CFG)
    vol = restore_volume(prep.x[:, 0], prep)
    assert vol.shape == (60, 20, 5)
    inside = np.zeros((60, 20, 5), dtype=bool)
    s = prep.window[0]
    inside[max(s, 0) : s + 32] = True
    brain = study["t1"].data > 0
    assert (vol.data[brain & inside] > 0).mean() > 0.99
    assert (vol.data[~inside] == 0).all()


def test_geometry_and_name_errors():
    study = synthetic_study()
    with pytest.raises(StudyGeometryError, match="shape"):
        prepare_study({"t1": study["t1"], "t2": Volume(study["t2"].data[:-1], RAS)}, MODS, CFG)
    shifted = RAS.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(StudyGeometryError, match="affine"):
        prepare_study({"t1": study["t1"], "t2": Volume(study["t2"].data, shifted)}, MODS, CFG)
    ok = RAS.copy()
    ok[0, 3] += 1e-4  # within tolerance
    prepare_study({"t1": study["t1"], "t2": Volume(study["t2"].data, ok)}, MODS, CFG)
    with pytest.raises(UnknownModalityError):
        prepare_study({"pd": study["t1"]}, MODS, CFG)
    with pytest.raises(NoInputError):
        prepare_study({}, MODS, CFG)
    assert prepare_study({"t1n": study["t1"], "T2F": study["flair"]}, MODS, CFG).available == (True, False, False, True)


def test_percentile_clipping_resists_hot_voxels():
    study = synthetic_study()
    hot = study["t1ce"].data.copy()
    hot[20, 22, 6] = 15_000.0
    prep = prepare_study({"t1ce": Volume(hot, RAS)}, MODS, CFG)
    assert np.median(prep.x[:, 2][prep.mask]) > -0.5  # the bulk of the brain is not squashed to -1


@requires_data(BRATS)
def test_real_lps_case_round_trip():
    from model.io.nifti import read_nifti

    vol = read_nifti(BRATS / "BraTS-GLI-00001-000-t2f.nii.gz")
    prep = prepare_study({"flair": vol}, MODS, PreprocessConfig())
    assert prep.x.shape[-2:] == (192, 192)
    out = restore_volume(prep.x[:, 3], prep)
    assert out.shape == vol.shape and np.array_equal(out.affine, vol.affine)
    brain = vol.data > 0
    assert np.corrcoef(out.data[brain], vol.data[brain])[0, 1] > 0.98
