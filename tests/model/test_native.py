"""The raw-study chain (model/native.py, model/brain_extraction.py) on real data: the IXI pair's known rigid
perturbation is recovered within 1 mm, auto's decision, the round trip atlas <-> native grid, and the refusals
(a non-head series, a series that cannot be registered) with the series named."""

from __future__ import annotations

import math
import os
import re

import nibabel as nib
import numpy as np
import pytest

from model import native
from model.errors import BrainExtractionError, RegistrationError
from model.io.nifti import read_nifti
from model.io.volume import Volume
from tests.model.conftest import BRATS, DATA

IXI = DATA / "ixi002_guys_0828_hdbet"
requires_ixi = pytest.mark.skipif(not IXI.is_dir(), reason=f"IXI pair {IXI} is absent")
requires_brats = pytest.mark.skipif(not BRATS.is_dir(), reason=f"BraTS case {BRATS} is absent")


@pytest.fixture(autouse=True)
def _one_itk_thread(monkeypatch):
    import SimpleITK as sitk  # noqa: N813

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def rigid(degrees: tuple[float, float, float], shift: tuple[float, float, float], centre: np.ndarray) -> np.ndarray:
    """4x4 world rotation (about x, y, z in turn, around ``centre``) then shift."""
    m = np.eye(3)
    for axis, deg in enumerate(degrees):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        m = r @ m
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = m, centre - m @ centre + np.asarray(shift)
    return out


@requires_ixi
@pytest.mark.slow
def test_ixi_known_rigid_perturbation_is_recovered_within_1mm():
    """T2 -> T1 of one subject (different grids). Moving the T2 in world space by a known rigid P (10 degrees,
    16 mm) must change the registration by exactly P: |R_perturbed x - P R x| < 1 mm over the brain."""
    t1 = native.isotropic(read_nifti(IXI / "hd_bet_IXI002-Guys-0828-T1.nii.gz"))
    t2 = read_nifti(IXI / "hd_bet_IXI002-Guys-0828-T2.nii.gz")
    mask = t1.data > 0
    base = native.register_rigid(t1, t2, mask, "t2")
    points = native.world_points(mask, t1.affine, limit=5000)
    centre = points.mean(axis=0)
    p = rigid((10.0, 0.0, 0.0), (0.0, 16.0, 0.0), centre)  # pitch 10 degrees, 16 mm along y
    assert native.rotation_deg(p) == pytest.approx(10.0)
    assert native.displacement_mm(p, points).mean() > 15.0  # the test's input: P moves the brain ~20 mm
    moved = native.register_rigid(t1, Volume(t2.data, p @ t2.affine), mask, "t2 perturbed")
    error = native.displacement_mm(np.linalg.inv(p @ base.matrix) @ moved.matrix, points)
    print(f"\nIXI perturbation recovered: max error {error.max():.3f} mm, mean {error.mean():.3f} mm over the brain")
    assert error.max() < 1.0, f"max error {error.max():.2f} mm (mean {error.mean():.2f})"
    assert moved.record["rotation_deg"] > 5.0  # it did move: the perturbation was not absorbed by the start


@requires_ixi
def test_a_series_with_nothing_in_common_is_refused_naming_it():
    t1 = native.isotropic(read_nifti(IXI / "hd_bet_IXI002-Guys-0828-T1.nii.gz"))
    t2 = read_nifti(IXI / "hd_bet_IXI002-Guys-0828-T2.nii.gz")
    noise = np.random.default_rng(0).gamma(2.0, 100.0, t2.shape).astype(np.float32)
    with pytest.raises(RegistrationError, match="mutual information") as err:
        native.register_rigid(t1, Volume(noise, t2.affine), t1.data > 0, "t2 (series 4 'noise')",
                              levels=(4, 2), iterations=20)
    assert err.value.series == "t2 (series 4 'noise')" and "series 4" in str(err.value)
    elsewhere = t2.affine.copy()
    elsewhere[:3, 3] += 400.0  # another place in the scanner: no overlap with the reference at all
    far = Volume(t2.data, elsewhere)
    with pytest.raises(RegistrationError, match="covers 0% of the reference brain"):
        native.register_rigid(t1, far, t1.data > 0, "t2 elsewhere", levels=(4,), iterations=5)


@requires_brats
@requires_ixi
def test_auto_decides_from_the_inputs():
    brats = {m: read_nifti(BRATS / f"BraTS-GLI-00001-000-{s}.nii.gz") for m, s in [("t1", "t1n"), ("t2", "t2w")]}
    assert native.assess(brats) == (True, [])
    slab = {m: Volume(v.data[:, :, 70:86], v.affine) for m, v in brats.items()}  # a block of slices: still BraTS
    assert native.assess(slab) == (True, [])
    ixi = {"t1": read_nifti(IXI / "hd_bet_IXI002-Guys-0828-T1.nii.gz"),
           "t2": read_nifti(IXI / "hd_bet_IXI002-Guys-0828-T2.nii.gz")}
    ok, reasons = native.assess(ixi)
    assert not ok and any("not on t1's grid" in r for r in reasons) and any("not 1 mm" in r for r in reasons)
    skull = dict(brats)
    skull["t2"] = Volume(brats["t2"].data + 5.0, brats["t2"].affine)  # background no longer 0
    ok, reasons = native.assess(skull)
    assert not ok and reasons == [r for r in reasons if r.startswith("t2 background")]
    # without T1 / T1CE: the finest voxel (1.06 mm3 against the T2's 1.10 mm3)
    assert native.choose_reference({"t2": ixi["t2"], "flair": ixi["t1"]}) == "flair"
    assert native.choose_reference({"t2": ixi["t2"], "t1ce": ixi["t1"], "t1": ixi["t1"]}) == "t1"


def test_transforms_round_trip_between_grids_exactly():
    """Resampling with a matrix and its inverse, LPS <-> RAS conversions, and the isotropic grid's extent."""
    rng = np.random.default_rng(1)
    affine = np.array([[0.0, 0.0, -1.8, 90], [0.9, 0.0, 0.0, -100], [0.0, -0.9, 0.0, 110], [0, 0, 0, 1]])
    vol = Volume(rng.random((20, 24, 10)).astype(np.float32), affine)
    iso = native.isotropic(vol)
    np.testing.assert_allclose(iso.spacing, (1.0, 1.0, 1.0))
    (lo, hi), (lo2, hi2) = native_box(vol), native_box(iso)
    np.testing.assert_allclose(hi - lo, hi2 - lo2, atol=1.0)  # the same field of view
    same = native.resample(vol, np.eye(4), vol.shape, vol.affine, "nearest")
    np.testing.assert_array_equal(same, vol.data)
    shift = np.eye(4)
    shift[:3, 3] = affine[:3, 0]  # one voxel along the first axis, in world mm
    moved = native.resample(vol, shift, vol.shape, vol.affine, "nearest")
    np.testing.assert_array_equal(moved[:-1], vol.data[1:])
    import SimpleITK as sitk  # noqa: N813

    t = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, -5.0, 6.0))
    m = native._matrix(t)
    p_lps = np.array([10.0, 20.0, 30.0])
    expected = np.array(t.TransformPoint(tuple(p_lps))) * [-1, -1, 1]
    np.testing.assert_allclose(m[:3, :3] @ (p_lps * [-1, -1, 1]) + m[:3, 3], expected, atol=1e-9)


def native_box(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    from model.io.geometry import world_box

    return world_box(vol.shape, vol.affine)


@pytest.mark.slow
def test_a_non_head_series_fails_brain_extraction_naming_it():
    """A water-bottle QA phantom (a cylinder with noise, 1 mm): deepbet returns a plausible-sized mask (2.1 L), but
    the masked image has nothing of a brain (mutual information with the SRI24 brain 0.19-0.28, heads 0.51-0.53):
    brain_extraction_failed, the series named."""
    from model.brain_extraction import extract_brain

    x, y, z = np.meshgrid(np.arange(160) - 80, np.arange(160) - 80, np.arange(200) - 100, indexing="ij")
    phantom = np.where((x**2 + y**2 < 70**2) & (np.abs(z) < 90), 800.0, 0.0)
    phantom += np.random.default_rng(0).normal(0, 20, phantom.shape)
    vol = Volume(np.abs(phantom).astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), {"source": "series 3 bottle"})
    with pytest.raises(BrainExtractionError) as err:
        native.to_atlas({"t1": vol}, extract_brain)
    print(err.value)
    # which check fires may vary with deepbet's mask of a bottle; each is a legitimate "not a head"
    assert re.search(r"does not look like a brain|mL, outside the plausible|found no brain|falls apart",
                     str(err.value)), str(err.value)
    assert err.value.series == "t1 (series 3 bottle)" and "series 3 bottle" in str(err.value)


def test_mask_plausibility():
    affine = np.eye(4)
    small = np.zeros((50, 50, 50), bool)
    small[10:20, 10:20, 10:20] = True
    with pytest.raises(BrainExtractionError, match="1 mL"):
        native.check_mask(small, affine, "t1")
    two = np.zeros((200, 200, 200), bool)
    two[10:100, 10:100, 10:100] = True
    two[110:190, 110:190, 110:190] = True
    with pytest.raises(BrainExtractionError, match="pieces"):
        native.check_mask(two, affine, "t1")
    one = np.zeros((200, 200, 200), bool)
    one[40:160, 40:160, 50:150] = True  # 1440 mL
    assert native.check_mask(one, affine, "t1") == {"volume_ml": 1440.0, "components": 1,
                                                      "largest_component_fraction": 1.0}


def test_atlas_is_the_brats_grid():
    atlas = native.load_atlas()
    assert atlas.shape == native.ATLAS_SHAPE
    np.testing.assert_array_equal(atlas.affine, native.ATLAS_AFFINE)
    if BRATS.is_dir():  # the BraTS grid: the same affine, and the template's brain where BraTS brains are
        img = nib.load(BRATS / "BraTS-GLI-00001-000-t1n.nii.gz")
        np.testing.assert_allclose(img.affine, native.ATLAS_AFFINE, atol=1e-4)
        a, b = atlas.data > 0, np.asarray(img.dataobj) > 0
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
