"""Dataset discovery, splits, loading and label conventions: synthetic folders per layout + the shared sample data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.data import (
    Case,
    DatasetError,
    find_cases,
    load_case,
    seg_to_regions,
    split_cases,
    validate_dataset,
)
from model.io.volume import Volume

SHARED_DATA = Path(__file__).parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared sample data not found at {SHARED_DATA}")


def _write(path: Path, shape=(6, 5, 4), value: float = 1.0, affine=None, data=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(shape, value, dtype=np.float32) if data is None else data
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def _brats(root: Path, case_id: str, sep: str, suffixes: list[str], seg: str | None = "seg") -> Path:
    folder = root / case_id
    for i, s in enumerate(suffixes):
        _write(folder / f"{case_id}{sep}{s}.nii.gz", value=i + 1)
    if seg:
        _write(folder / f"{case_id}{sep}{seg}.nii.gz", value=0)
    return folder


# ---------------------------------------------------------------------------------------------- layouts

LAYOUT_TABLE = [
    # (layout, case id, separator, file suffixes, expected model modalities)
    ("brats2020", "BraTS20_Training_001", "_", ["t1", "t1ce", "t2", "flair"], ("t1", "t2", "t1ce", "flair")),
    ("brats2021", "BraTS2021_00000", "_", ["t1", "t1ce", "t2", "flair"], ("t1", "t2", "t1ce", "flair")),
    ("brats2023", "BraTS-GLI-00000-000", "-", ["t1n", "t1c", "t2w", "t2f"], ("t1", "t2", "t1ce", "flair")),
]


@pytest.mark.parametrize(("layout", "case_id", "sep", "suffixes", "expected"), LAYOUT_TABLE)
def test_brats_layouts_map_names_to_model_vocabulary(tmp_path, layout, case_id, sep, suffixes, expected):
    folder = _brats(tmp_path, case_id, sep, suffixes)
    for root in (folder, tmp_path, [folder]):  # one case folder, a folder of cases, a list of case folders
        (case,) = find_cases(root)
        assert case.layout == layout and case.id == case_id
        assert case.modalities == expected
        assert case.seg == folder / f"{case_id}{sep}seg.nii.gz" and not case.seg_is_prediction
    # file names map to the right modality, e.g. 2023 t2f -> flair, t1c -> t1ce
    (case,) = find_cases(folder)
    assert case.images["flair"].name.endswith(f"{sep}{suffixes[3]}.nii.gz")
    assert case.images["t1ce"].name.endswith(f"{sep}{suffixes[1]}.nii.gz")


def test_brats2023_subject_strips_time_point(tmp_path):
    _brats(tmp_path, "BraTS-GLI-00007-000", "-", ["t1n", "t1c", "t2w", "t2f"])
    _brats(tmp_path, "BraTS-GLI-00007-001", "-", ["t1n", "t1c", "t2w", "t2f"])
    cases = find_cases(tmp_path)
    assert [c.id for c in cases] == ["BraTS-GLI-00007-000", "BraTS-GLI-00007-001"]
    assert {c.subject for c in cases} == {"BraTS-GLI-00007"}
    splits = split_cases(cases, seed=0, val_fraction=0.5)
    assert sum(len(v) for v in splits.values()) == 2
    assert len(splits["train"]) in (0, 2)  # both time points go to the same split


def test_brats_toolkit_layout_marks_predicted_seg(tmp_path):
    folder = tmp_path / "tcga"
    for s in ("t1", "t1c", "t2", "fla"):
        _write(folder / f"TCGA-DU-7294_{s}.nii.gz")
    _write(folder / "fusion_simple_predicted_seg.nii.gz", value=0)
    (case,) = find_cases(folder)
    assert case.layout == "brats-toolkit" and case.id == "TCGA-DU-7294"
    assert case.modalities == ("t1", "t2", "t1ce", "flair")
    assert case.images["flair"].name == "TCGA-DU-7294_fla.nii.gz"
    assert case.seg is not None and case.seg.name == "fusion_simple_predicted_seg.nii.gz"
    assert case.seg_is_prediction


def test_wmh_layout(tmp_path):
    for site, cid in (("Utrecht", "0"), ("Singapore", "50")):
        _write(tmp_path / site / cid / "pre" / "FLAIR.nii.gz")
        _write(tmp_path / site / cid / "pre" / "T1.nii.gz")
        _write(tmp_path / site / cid / "wmh.nii.gz", value=0)
    cases = find_cases(tmp_path, layout="wmh")
    assert [c.id for c in cases] == ["Singapore_50", "Utrecht_0"]
    assert all(c.modalities == ("t1", "flair") and c.seg is not None and c.seg.name == "wmh.nii.gz" for c in cases)
    # a site folder, or one case folder, work as roots too
    assert [c.id for c in find_cases(tmp_path / "Utrecht")] == ["Utrecht_0"]
    assert [c.id for c in find_cases(tmp_path / "Utrecht" / "0")] == ["Utrecht_0"]


def test_ixi_layout_flat_prefixed_and_split_across_folders(tmp_path):
    _write(tmp_path / "a" / "hd_bet_IXI002-Guys-0828-T1.nii.gz")
    _write(tmp_path / "a" / "hd_bet_IXI002-Guys-0828-T2.nii.gz", shape=(4, 5, 6))
    _write(tmp_path / "IXI-PD" / "IXI002-Guys-0828-PD.nii.gz")
    _write(tmp_path / "IXI-T1" / "IXI012-HH-1211-T1.nii.gz")
    cases = find_cases(tmp_path)
    assert [c.id for c in cases] == ["IXI002-Guys-0828", "IXI012-HH-1211"]
    assert cases[0].layout == "ixi" and cases[0].modalities == ("t1", "t2", "pd") and cases[0].seg is None
    report = validate_dataset(tmp_path)
    assert any("IXI002-Guys-0828" in p and "shape" in p for p in report["problems"])


def test_layout_filter_and_required_modalities(tmp_path):
    _brats(tmp_path, "BraTS2021_00001", "_", ["t1", "t1ce", "t2"], seg=None)  # no flair, no seg
    (case,) = find_cases(tmp_path, layout="brats2021")
    assert case.seg is None and "flair" not in case.images
    with pytest.raises(DatasetError, match="BraTS2021_00001.*flair"):
        find_cases(tmp_path, modalities=["t1", "flair"])
    with pytest.raises(DatasetError, match="layout 'wmh'"):
        find_cases(tmp_path, layout="wmh")
    with pytest.raises(DatasetError, match="unknown layout 'brats2019'"):
        find_cases(tmp_path, layout="brats2019")
    with pytest.raises(DatasetError, match="unknown modalities"):
        find_cases(tmp_path, modalities=["T1"])


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        find_cases(tmp_path / "nope")
    _write(tmp_path / "empty" / "random_name.nii.gz")
    with pytest.raises(DatasetError, match="no cases"):
        find_cases(tmp_path / "empty")
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match="unknown modalities"):
        Case(id="x", images={"T1": tmp_path / "a.nii.gz"}, seg=None, layout="ixi")


def test_duplicate_case_ids_are_an_error(tmp_path):
    _brats(tmp_path / "one", "BraTS20_Training_001", "_", ["t1", "t2"], seg=None)
    _brats(tmp_path / "two", "BraTS20_Training_001", "_", ["t1", "t2"], seg=None)
    with pytest.raises(DatasetError, match="found twice"):
        find_cases(tmp_path)


def test_load_case_returns_volumes_and_seg(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    folder = tmp_path / "BraTS20_Training_002"
    for i, s in enumerate(("t1", "t1ce", "t2", "flair")):
        _write(folder / f"BraTS20_Training_002_{s}.nii.gz", value=i, affine=affine)
    labels = np.zeros((6, 5, 4), dtype=np.uint8)
    labels[1, 1, 1] = 4
    _write(folder / "BraTS20_Training_002_seg.nii.gz", data=labels, affine=affine)
    (case,) = find_cases(folder)
    images, seg = load_case(case)
    assert set(images) == {"t1", "t2", "t1ce", "flair"} and all(isinstance(v, Volume) for v in images.values())
    assert images["t2"].data.mean() == 2 and np.allclose(images["t1"].affine, affine)
    assert seg is not None and seg.data[1, 1, 1] == 4
    (folder / "BraTS20_Training_002_t2.nii.gz").unlink()
    with pytest.raises(DatasetError, match="BraTS20_Training_002_t2.nii.gz"):
        load_case(case)


# ---------------------------------------------------------------------------------------------- labels


def test_seg_to_regions_brats_conventions():
    old = np.array([0, 1, 2, 4])
    r = seg_to_regions(old, "brats2020")
    assert r.shape == (4, 4) and r.dtype == bool
    np.testing.assert_array_equal(r, [[1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    new = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(seg_to_regions(new, "brats2023"), r)  # same regions, 2023 numbering
    np.testing.assert_array_equal(seg_to_regions(old, "brats2021"), r)


def test_seg_to_regions_wmh_ignores_label_2():
    r = seg_to_regions(np.array([[0, 1, 2]]), "wmh")
    assert r.shape == (4, 1, 3)
    np.testing.assert_array_equal(r[:, 0], [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert not r[:, 0, 2].any()  # the ignored voxel is in no channel
    with pytest.raises(DatasetError, match="ixi"):
        seg_to_regions(np.zeros(3), "ixi")


# ---------------------------------------------------------------------------------------------- splits


def _fake_cases(n: int) -> list[Case]:
    return [Case(id=f"c{i:02d}", images={"t1": Path(f"/x/c{i}.nii")}, seg=None, layout="ixi") for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    cases = _fake_cases(20)
    a = split_cases(cases, seed=3, val_fraction=0.2, test_fraction=0.1)
    b = split_cases(list(reversed(cases)), seed=3, val_fraction=0.2, test_fraction=0.1)
    assert {k: [c.id for c in v] for k, v in a.items()} == {k: [c.id for c in v] for k, v in b.items()}
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 4, 2)
    ids = [c.id for v in a.values() for c in v]
    assert sorted(ids) == sorted(c.id for c in cases) and len(set(ids)) == len(ids)
    c = split_cases(cases, seed=4, val_fraction=0.2, test_fraction=0.1)
    assert [x.id for x in c["val"]] != [x.id for x in a["val"]]


def test_named_test_cases_are_always_held_out_and_counted_in_the_fraction():
    cases = _fake_cases(20)
    split = split_cases(cases, seed=3, val_fraction=0.1, test_fraction=0.2, test_cases=["c07", "c13", "absent"])
    test = [c.id for c in split["test"]]
    assert {"c07", "c13"} <= set(test) and len(test) == 4 and len(split["val"]) == 2
    # without named cases the seeded draw is today's
    plain = split_cases(cases, seed=3, val_fraction=0.2, test_fraction=0.1)
    assert plain == split_cases(cases, seed=3, val_fraction=0.2, test_fraction=0.1, test_cases=[])
    more = split_cases(cases, seed=3, val_fraction=0.1, test_fraction=0.05, test_cases=["c01", "c02", "c03"])
    assert [c.id for c in more["test"]] == ["c01", "c02", "c03"]  # the named ones even beyond the fraction


def test_split_small_sets_keep_a_training_case():
    two = split_cases(_fake_cases(2), seed=0, val_fraction=0.2)
    assert len(two["train"]) == 1 and len(two["val"]) == 1
    one = split_cases(_fake_cases(1), seed=0, val_fraction=0.5)
    assert len(one["train"]) == 1 and not one["val"]
    with pytest.raises(DatasetError, match="val_fraction"):
        split_cases(_fake_cases(4), seed=0, val_fraction=0.6, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------- real sample data


@needs_shared
def test_shared_sample_data():
    cases = {c.id: c for c in find_cases(SHARED_DATA)}
    assert {"BraTS-GLI-00001-000", "TCGA-DU-7294", "IXI002-Guys-0828"} <= set(cases)
    brats = cases["BraTS-GLI-00001-000"]
    assert brats.layout == "brats2023" and brats.modalities == ("t1", "t2", "t1ce", "flair") and brats.seg is None
    tcga = cases["TCGA-DU-7294"]
    assert tcga.layout == "brats-toolkit" and tcga.seg_is_prediction
    assert tcga.modalities == ("t1", "t2", "t1ce", "flair")
    ixi = cases["IXI002-Guys-0828"]
    assert ixi.layout == "ixi" and ixi.modalities == ("t1", "t2")
    report = validate_dataset(SHARED_DATA / "tcga_du_7294_preprocessed")
    assert report["n_cases"] == 1 and report["problems"] == [] and report["cases"][0]["labels"] == [0, 1, 2]
    images, seg = load_case(tcga)
    assert images["flair"].shape == (240, 240, 155) and seg is not None
    regions = seg_to_regions(seg.data, tcga.layout)
    assert regions[1].sum() > 0 and regions[1].sum() == (seg.data > 0).sum()


def test_cli_reports_problems_with_exit_code(tmp_path, capsys):
    from model.data import main

    _brats(tmp_path, "BraTS20_Training_003", "_", ["t1", "t2"])
    assert main([str(tmp_path)]) == 0
    assert '"n_cases": 1' in capsys.readouterr().out
    _write(tmp_path / "BraTS20_Training_003" / "BraTS20_Training_003_flair.nii.gz", shape=(3, 3, 3))
    assert main([str(tmp_path)]) == 1
    assert "flair shape (3, 3, 3) differs" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
