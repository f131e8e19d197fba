"""Raw clinical studies -> the model's space and the result back (docs/imaging.md, "Raw studies").

The model was trained on BraTS-style volumes: skull-stripped, co-registered, 1 mm, on the SRI24 atlas grid
(240x240x155). A hospital study is none of that. :func:`to_atlas` brings one there and :func:`from_atlas` maps the
synthesized volume back onto a native grid:

1. :func:`assess` decides ``preprocess="auto"``: one shared grid, background 0, near 1 mm -> nothing to do
   (today's path, bit for bit); anything else -> the full chain;
2. reference sequence (:func:`choose_reference`): the 3D T1, else T1CE, else the finest other; a 1 mm isotropic
   copy of it is used to compute transforms only;
3. brain extraction of that copy (``extract``: a callable, :func:`model.brain_extraction.extract_brain` in the
   service), checked by :func:`check_mask` (intracranial volume, one component) and, after step 5, by its mutual
   information with the atlas brain -> :class:`BrainExtractionError`;
4. rigid co-registration of every other sequence to the reference (:func:`register_rigid`: Mattes mutual
   information, three resolutions, started from the scanner coordinates) -> :class:`RegistrationError` when
   implausible;
5. affine registration of the reference brain to the SRI24 T1 brain (:func:`register_affine`); every native image
   is resampled ONCE into the atlas grid through the composed transform (B-spline; nearest for the mask), masked;
6. after synthesis, :func:`from_atlas` resamples the result with the inverse transform onto the requested grid.

Transforms are 4x4 matrices in world RAS mm (the NIfTI convention of :class:`~model.io.volume.Volume`) mapping a
point of the fixed grid to the matching point of the moving one; :attr:`NativeStudy.record` holds all of them.
SimpleITK + numpy only: no torch here (brain extraction is passed in).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

from model.errors import BrainExtractionError, RegistrationError
from model.io.volume import Volume

ATLAS_PATH = Path(__file__).parent / "atlas" / "sri24_t1_brain.nii.gz"
ATLAS_SHAPE = (240, 240, 155)  # the BraTS grid: the SRI24 box with the y axis reversed
ATLAS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)
ICV_ML = (700.0, 2300.0)  # plausible intracranial volume of a brain mask (adults and adolescents)
MAX_ROTATION_DEG = 30.0  # rigid motion between two series of one session beyond this is a failed registration
MAX_SHIFT_MM = 60.0
AFFINE_SCALE = (0.6, 1.6)  # per-axis scale of a head to the atlas
MIN_COVERAGE = 0.5  # fraction of the reference brain a registered series must cover
MIN_ATLAS_MI = 0.4  # the extracted brain against the SRI24 brain: brains here 0.50-0.53, a bottle phantom 0.19-0.28
MIN_MI = 0.15  # mutual information (nats, Mattes, 32 bins) at the solution below which nothing was matched
INTERPOLATORS = {"images": "B-spline (cubic)", "mask": "nearest neighbour", "transform_images": "linear"}

Extract = Callable[[Volume, str], np.ndarray]


# ====================================================================== geometry helpers


def _sitk_image(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A numpy ``(X, Y, Z)`` array on a RAS affine -> SimpleITK image (LPS physical space)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    lps = LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    return img


def _grid(shape: Sequence[int], affine: np.ndarray) -> sitk.Image:
    return _sitk_image(np.zeros(tuple(int(s) for s in shape), dtype=np.float32), affine)


def _array(img: sitk.Image) -> np.ndarray:
    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def _transform(matrix_ras: np.ndarray) -> sitk.AffineTransform:
    lps = LPS @ np.asarray(matrix_ras, dtype=np.float64) @ LPS
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in lps[:3, 3]])
    return t


def _matrix(t: sitk.Transform) -> np.ndarray:
    """A SimpleITK matrix transform (Euler3D, Affine, ...; a composite of them) -> 4x4 RAS matrix."""
    if isinstance(t, sitk.CompositeTransform) or t.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(t)
        m = np.eye(4)
        for i in range(comp.GetNumberOfTransforms()):  # applied last to first
            m = m @ _matrix(comp.GetNthTransform(i))
        return m
    kind = getattr(sitk, t.GetName(), None)
    t = kind(t) if kind is not None else t
    a = np.array(t.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.array(t.GetCenter(), dtype=np.float64)
    tr = np.array(t.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = a, c + tr - a @ c
    return LPS @ lps @ LPS


def resample(volume: Volume, matrix: np.ndarray, shape: Sequence[int], affine: np.ndarray,
             interpolator: str = "bspline") -> np.ndarray:
    """``volume`` sampled on the grid ``(shape, affine)``; ``matrix`` maps a point of that grid to ``volume``'s world
    point (RAS mm). 0 outside ``volume``. ``interpolator``: bspline, linear or nearest."""
    kind = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    out = sitk.Resample(_sitk_image(volume.data, volume.affine), _grid(shape, affine), _transform(matrix), kind,
                        0.0, sitk.sitkFloat32)
    return _array(out)


def isotropic(volume: Volume, spacing: float = 1.0) -> Volume:
    """The same field of view and orientation at ``spacing`` mm (linear): the grid transforms are computed on."""
    zooms = np.array(volume.spacing)
    shape = np.maximum(np.round(np.array(volume.shape) * zooms / spacing).astype(int), 1)
    direction = volume.affine[:3, :3] / zooms
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    first = volume.affine[:3, :3] @ (np.full(3, -0.5)) + volume.affine[:3, 3]  # outer corner of voxel 0
    affine[:3, 3] = first + affine[:3, :3] @ np.full(3, 0.5)
    data = resample(volume, np.eye(4), shape, affine, "linear")
    return Volume(data, affine, dict(volume.meta))


def grid_record(shape: Sequence[int], affine: np.ndarray, name: str = "") -> dict[str, Any]:
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    direction = np.asarray(affine, dtype=np.float64)[:3, :3] / spacing
    return {"name": name, "shape": [int(s) for s in shape], "spacing_mm": [round(float(s), 5) for s in spacing],
            "direction_ras": np.round(direction, 6).tolist(), "origin_ras": np.round(affine[:3, 3], 4).tolist(),
            "affine_ras": np.round(np.asarray(affine, dtype=np.float64), 6).tolist()}


def rotation_deg(matrix: np.ndarray) -> float:
    """Rotation angle of the (closest rotation to the) 3x3 part of ``matrix``."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    r = u @ vt
    return float(math.degrees(math.acos(float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)))))


def displacement_mm(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(N,)`` distance each of ``points (N, 3)`` (world mm) moves under ``matrix``."""
    moved = points @ matrix[:3, :3].T + matrix[:3, 3]
    return np.linalg.norm(moved - points, axis=1)


def coverage_of(points: np.ndarray, matrix: np.ndarray, moving: Volume) -> float:
    """Fraction of ``points`` (world mm) that ``matrix`` maps inside ``moving``'s grid."""
    moved = points @ matrix[:3, :3].T + matrix[:3, 3]
    inv = np.linalg.inv(moving.affine)
    ijk = moved @ inv[:3, :3].T + inv[:3, 3]
    return float(np.all((ijk > -0.5) & (ijk < np.array(moving.shape) - 0.5), axis=1).mean())


def world_points(mask: np.ndarray, affine: np.ndarray, limit: int = 20000, seed: int = 0) -> np.ndarray:
    """At most ``limit`` world points (mm) of the voxels of ``mask``."""
    ijk = np.argwhere(mask)
    if len(ijk) > limit:
        ijk = ijk[np.random.default_rng(seed).choice(len(ijk), limit, replace=False)]
    return ijk @ affine[:3, :3].T + affine[:3, 3]


# ====================================================================== 1. decide


def assess(volumes: dict[str, Volume]) -> tuple[bool, list[str]]:
    """Is the study already BraTS-like (one shared grid, skull-stripped background, near 1 mm)? And why not."""
    reasons: list[str] = []
    items = list(volumes.items())
    first_name, first = items[0]
    for name, v in items[1:]:
        if v.shape != first.shape or not np.allclose(v.affine, first.affine, atol=1e-3):
            reasons.append(f"{name} is not on {first_name}'s grid")
    for name, v in items:
        if any(abs(s - 1.0) > 0.1 for s in v.spacing):
            reasons.append(f"{name} voxels are {'x'.join(f'{s:.2f}' for s in v.spacing)} mm, not 1 mm")
        data = np.nan_to_num(np.asarray(v.data, dtype=np.float32))
        faces = [data[0], data[-1], data[:, 0], data[:, -1], data[:, :, 0], data[:, :, -1]]
        clear = sum(np.count_nonzero(f) <= 0.01 * f.size for f in faces)  # a slab cut through the brain: 4 of 6
        zero = float((data == 0).mean())
        if zero < 0.5 or clear < 4:
            reasons.append(f"{name} background is not 0 (skull on? {zero:.0%} of voxels are 0, {clear} of 6 faces "
                           f"empty)")
    return not reasons, reasons


def choose_reference(volumes: dict[str, Volume]) -> str:
    """The 3D T1 if supplied (else the T1 anyway), else T1CE, else the finest other (smallest voxel)."""
    for m in ("t1", "t1ce"):
        if m in volumes:
            return m
    return min(volumes, key=lambda m: float(np.prod(volumes[m].spacing)))


def series_name(volume: Volume, modality: str) -> str:
    """How an error names a series: the DICOM series number and description, or the file."""
    dicom = volume.meta.get("dicom") or {}
    if dicom:
        return f"{modality} (series {dicom.get('series_number', '?')} {dicom.get('series_description', '')!r})"
    return f"{modality} ({volume.meta.get('source', 'upload')})"


# ====================================================================== 3. mask check


def check_mask(mask: np.ndarray, affine: np.ndarray, name: str) -> dict[str, Any]:
    """Plausibility of a brain mask: intracranial volume in :data:`ICV_ML`, one main connected component."""
    from scipy import ndimage

    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:] if n else np.zeros(0)
    volume_ml = float(mask.sum()) * voxel_ml
    largest = float(sizes.max() / sizes.sum()) if n else 0.0
    facts = {"volume_ml": round(volume_ml, 1), "components": int(n), "largest_component_fraction": round(largest, 4)}
    if not ICV_ML[0] <= volume_ml <= ICV_ML[1]:
        raise BrainExtractionError(f"{name}: the brain mask holds {volume_ml:.0f} mL, outside the plausible "
                                   f"{ICV_ML[0]:.0f}-{ICV_ML[1]:.0f} mL of a head (not a brain series?)", series=name)
    if largest < 0.95:
        raise BrainExtractionError(f"{name}: the brain mask falls apart in {n} pieces (largest "
                                   f"{largest:.0%}): not one brain", series=name)
    return facts


# ====================================================================== 4./5. registration


def _method(levels: Sequence[int], iterations: int, sampling: float, seed: int) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(sampling, seed)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                               relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(list(levels))
    r.SetSmoothingSigmasPerLevel([max(0.0, (s - 1) / 1.5) for s in levels])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return r


def _mi(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, mask: sitk.Image | None) -> float:
    """Mattes mutual information (nats) of the two images under ``transform``, on all fixed (masked) voxels."""
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.NONE)
    r.SetInterpolator(sitk.sitkLinear)
    if mask is not None:
        r.SetMetricFixedMask(mask)
    r.SetInitialTransform(transform)
    return -float(r.MetricEvaluate(fixed, moving))


@dataclass
class Registration:
    matrix: np.ndarray  # 4x4 RAS: fixed world point -> moving world point
    record: dict[str, Any]


def register_rigid(fixed: Volume, moving: Volume, fixed_mask: np.ndarray, name: str, *,
                   levels: Sequence[int] = (4, 2, 1), iterations: int = 60, sampling: float = 0.1, seed: int = 0
                   ) -> Registration:
    """Rigid (6 parameters) ``moving`` -> ``fixed``, starting from the scanner coordinates (identity).

    ``fixed`` is the 1 mm reference, ``fixed_mask`` its brain: the metric is evaluated inside the brain only, so
    skull and neck (which move differently) do not steer it. Raises :class:`RegistrationError` naming ``name``
    when the optimiser fails or the solution is implausible (rotation, shift, coverage, mutual information).
    """
    t0 = time.perf_counter()
    points = world_points(fixed_mask, fixed.affine)
    start = coverage_of(points, np.eye(4), moving)
    if start < MIN_COVERAGE / 2:
        raise RegistrationError(f"{name}: in scanner coordinates the series covers {start:.0%} of the reference "
                                f"brain: not the same head or not the same session (nothing to start from)",
                                series=name)
    f_img, m_img = _sitk_image(fixed.data, fixed.affine), _sitk_image(moving.data, moving.affine)
    mask_img = sitk.Cast(_sitk_image(fixed_mask.astype(np.float32), fixed.affine), sitk.sitkUInt8)
    init = sitk.Euler3DTransform()
    centre = fixed.affine[:3, :3] @ (np.argwhere(fixed_mask).mean(axis=0)) + fixed.affine[:3, 3]
    init.SetCenter([float(v) for v in (LPS[:3, :3] @ centre)])
    r = _method(levels, iterations, sampling, seed)
    r.SetMetricFixedMask(mask_img)
    r.SetInitialTransform(init, inPlace=False)
    try:
        out = r.Execute(f_img, m_img)
    except RuntimeError as exc:
        raise RegistrationError(f"{name}: rigid registration to the reference failed ({str(exc)[-200:]})",
                                series=name) from exc
    matrix = _matrix(out)
    coverage = coverage_of(points, matrix, moving)
    mi = _mi(f_img, m_img, out, mask_img)
    record = {
        "kind": "rigid (Euler3D, 6 parameters)", "fixed": grid_record(fixed.shape, fixed.affine, "reference 1 mm"),
        "moving": grid_record(moving.shape, moving.affine, name), "matrix_ras": np.round(matrix, 8).tolist(),
        "metric": "Mattes mutual information, 32 bins, in the reference brain mask",
        "mutual_information": round(mi, 5), "levels": list(levels), "iterations": r.GetOptimizerIteration(),
        "stop": r.GetOptimizerStopConditionDescription()[-160:], "rotation_deg": round(rotation_deg(matrix), 4),
        "max_brain_shift_mm": round(float(displacement_mm(matrix, points).max()), 4),
        "brain_coverage": round(coverage, 4), "seconds": round(time.perf_counter() - t0, 3),
    }
    problems = []
    if record["rotation_deg"] > MAX_ROTATION_DEG:
        problems.append(f"rotation {record['rotation_deg']:.1f} deg > {MAX_ROTATION_DEG:g}")
    if record["max_brain_shift_mm"] > MAX_SHIFT_MM:
        problems.append(f"brain moves {record['max_brain_shift_mm']:.1f} mm > {MAX_SHIFT_MM:g}")
    if coverage < MIN_COVERAGE:
        problems.append(f"the series covers {coverage:.0%} of the reference brain (< {MIN_COVERAGE:.0%})")
    if mi < MIN_MI:
        problems.append(f"mutual information {mi:.3f} < {MIN_MI} (nothing in common with the reference)")
    if problems:
        raise RegistrationError(f"{name}: registration to the reference is implausible: {'; '.join(problems)}",
                                series=name)
    return Registration(matrix, record)


def load_atlas() -> Volume:
    import nibabel as nib

    img = nib.load(str(ATLAS_PATH))
    return Volume(np.asarray(img.dataobj, dtype=np.float32), img.affine, {"source": ATLAS_PATH.name})


def register_affine(brain: Volume, name: str, *, atlas: Volume | None = None, levels: Sequence[int] = (4, 2),
                    iterations: int = 80, sampling: float = 0.05, seed: int = 0) -> Registration:
    """Affine (12 parameters) of the skull-stripped reference ``brain`` to the SRI24 T1 brain: matrix maps an atlas
    point to the reference's. Started from the centres of mass; a rigid stage first, then affine."""
    t0 = time.perf_counter()
    atlas = atlas or load_atlas()
    f_img, m_img = _sitk_image(atlas.data, atlas.affine), _sitk_image(brain.data, brain.affine)
    rigid = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    r1 = _method((8, 4), iterations, sampling, seed)
    r1.SetInitialTransform(rigid, inPlace=False)
    r2 = _method(levels, iterations, sampling, seed)
    try:
        stage1 = r1.Execute(f_img, m_img)
        affine = sitk.AffineTransform(3)
        m1 = LPS @ _matrix(stage1) @ LPS
        affine.SetCenter(rigid.GetCenter())
        c = np.array(rigid.GetCenter())
        affine.SetMatrix([float(v) for v in m1[:3, :3].ravel()])
        affine.SetTranslation([float(v) for v in m1[:3, :3] @ c + m1[:3, 3] - c])
        r2.SetInitialTransform(affine, inPlace=False)
        out = r2.Execute(f_img, m_img)
    except RuntimeError as exc:
        raise RegistrationError(f"{name}: affine registration to the SRI24 atlas failed ({str(exc)[-200:]})",
                                series=name) from exc
    matrix = _matrix(out)
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    mi = _mi(f_img, m_img, out, None)
    record = {
        "kind": "affine (12 parameters), after a rigid stage from the centres of mass",
        "fixed": grid_record(atlas.shape, atlas.affine, "SRI24 T1 brain (BraTS grid)"),
        "moving": grid_record(brain.shape, brain.affine, f"{name} brain, 1 mm"),
        "matrix_ras": np.round(matrix, 8).tolist(), "metric": "Mattes mutual information, 32 bins",
        "mutual_information": round(mi, 5), "levels": [[8, 4], list(levels)],
        "iterations": [r1.GetOptimizerIteration(), r2.GetOptimizerIteration()],
        "stop": r2.GetOptimizerStopConditionDescription()[-160:],
        "scales": [round(float(s), 4) for s in scales], "determinant": round(float(np.linalg.det(matrix[:3, :3])), 5),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if not (AFFINE_SCALE[0] <= scales.min() and scales.max() <= AFFINE_SCALE[1]) or record["determinant"] <= 0:
        raise RegistrationError(f"{name}: the affine to the atlas is implausible (scales {record['scales']}, "
                                f"determinant {record['determinant']})", series=name)
    return Registration(matrix, record)


# ====================================================================== the chain


@dataclass
class NativeStudy:
    """A native study brought onto the atlas grid, and what :func:`from_atlas` needs to go back."""

    atlas_volumes: dict[str, Volume]  # by modality, on ATLAS_SHAPE / ATLAS_AFFINE, masked, background 0
    atlas_mask: np.ndarray  # bool, atlas grid
    reference: str
    to_native: dict[str, np.ndarray]  # modality -> 4x4: atlas point -> that series' world point
    grids: dict[str, tuple[tuple[int, int, int], np.ndarray]]  # modality -> native (shape, affine)
    reference_iso: Volume  # the 1 mm reference the transforms were computed on
    mask_iso: np.ndarray  # its brain mask
    to_reference: dict[str, np.ndarray]  # modality -> 4x4: 1 mm reference point -> that series' point (rigid)
    record: dict[str, Any] = field(default_factory=dict)

    def mask_on(self, grid: str) -> np.ndarray:
        """The brain mask on a native grid (a modality's name) or on ``atlas``."""
        if grid == "atlas":
            return self.atlas_mask
        shape, affine = self.grids[grid]
        m = resample(Volume(self.mask_iso.astype(np.float32), self.reference_iso.affine),
                     np.linalg.inv(self.to_reference[grid]), shape, affine, "nearest")
        return m > 0.5


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def to_atlas(volumes: dict[str, Volume], extract: Extract, *, reference: str | None = None,
             rigid_levels: Sequence[int] = (4, 2, 1), rigid_iterations: int = 60,
             progress: Callable[[str, float], None] | None = None) -> NativeStudy:
    """Steps 2-5: reference, brain extraction, rigid to the reference, affine to the atlas, one resampling each.

    ``reference``: the series transforms are computed from (default :func:`choose_reference`). Every other series
    goes through rigid registration (a validation reference too, so that the result can be put on its grid; it
    never enters the model). ``extract`` raises :class:`BrainExtractionError` when it finds no brain.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    reference = reference or choose_reference(volumes)
    names = {m: series_name(v, m) for m, v in volumes.items()}
    ref_iso = isotropic(volumes[reference])
    timings["isotropic"] = time.perf_counter() - t0
    t = time.perf_counter()
    if progress:
        progress("brain_extraction", 0.0)
    mask_iso = np.asarray(extract(ref_iso, names[reference]), dtype=bool)
    mask_facts = check_mask(mask_iso, ref_iso.affine, names[reference])
    timings["brain_extraction"] = time.perf_counter() - t

    to_reference = {reference: np.eye(4)}
    transforms: list[dict[str, Any]] = []
    for i, m in enumerate(volumes):
        if m == reference:
            continue
        if progress:
            progress("registration", i / max(1, len(volumes)))
        reg = register_rigid(ref_iso, volumes[m], mask_iso, names[m], levels=rigid_levels,
                             iterations=rigid_iterations)
        to_reference[m] = reg.matrix
        transforms.append({"name": f"rigid {m} -> {reference}", "modality": m, **reg.record})
    timings["rigid"] = time.perf_counter() - t - timings["brain_extraction"]
    t = time.perf_counter()
    brain = Volume(np.where(mask_iso, ref_iso.data, 0.0).astype(np.float32), ref_iso.affine)
    aff = register_affine(brain, names[reference])
    transforms.append({"name": f"affine atlas -> {reference}", "modality": reference, **aff.record})
    if aff.record["mutual_information"] < MIN_ATLAS_MI:
        raise BrainExtractionError(f"{names[reference]}: the extracted region does not look like a brain (mutual "
                                   f"information with the SRI24 T1 brain {aff.record['mutual_information']:.2f} < "
                                   f"{MIN_ATLAS_MI}; not a head?)", series=names[reference])
    timings["affine"] = time.perf_counter() - t

    t = time.perf_counter()
    atlas_mask = resample(Volume(mask_iso.astype(np.float32), ref_iso.affine), aff.matrix, ATLAS_SHAPE,
                          ATLAS_AFFINE, "nearest") > 0.5
    to_native = {m: to_reference[m] @ aff.matrix for m in to_reference}
    atlas_volumes = {}
    for m in to_reference:
        data = resample(volumes[m], to_native[m], ATLAS_SHAPE, ATLAS_AFFINE, "bspline")
        inside = data[atlas_mask]
        floor = max(float(np.percentile(inside, 99.5)) * 1e-4, 1e-6) if inside.size else 1e-6
        data = np.where(atlas_mask, np.maximum(data, floor), 0.0).astype(np.float32)  # brain > 0, background 0
        atlas_volumes[m] = Volume(data, ATLAS_AFFINE.copy(), {"source": f"{volumes[m].meta.get('source', m)} "
                                                                        f"(atlas space)"})
    for tr in transforms:
        if tr["name"].startswith("rigid"):
            tr["composed_atlas_to_moving_ras"] = np.round(to_native[tr["modality"]], 8).tolist()
    timings["resample"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    record = {
        "mode": "full", "reference": reference, "reference_series": names[reference],
        "reference_grid_1mm": grid_record(ref_iso.shape, ref_iso.affine, f"{reference} 1 mm isotropic"),
        "atlas": {"name": "SRI24 T1 brain (Rohlfing et al. 2010, CC BY-SA 3.0), BraTS grid",
                  **grid_record(ATLAS_SHAPE, ATLAS_AFFINE), "sha256": _sha256(ATLAS_PATH)},
        "brain_mask": {"computed_on": f"{reference} 1 mm", **mask_facts,
                       "atlas_voxels": int(atlas_mask.sum())},
        "transforms": transforms,
        "transform_convention": "4x4 matrices in world RAS mm (NIfTI), mapping a fixed-grid point to the moving "
                                "image's point; the atlas -> series transform is rigid @ affine",
        "interpolators": INTERPOLATORS,
        "versions": {"SimpleITK": sitk.Version.VersionString(), "numpy": np.__version__},
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    return NativeStudy(atlas_volumes, atlas_mask, reference, to_native,
                       {m: (tuple(int(s) for s in v.shape), v.affine.copy()) for m, v in volumes.items()},  # type: ignore[misc]
                       ref_iso, mask_iso, to_reference, record)


def from_atlas(volume: Volume, study: NativeStudy, grid: str) -> Volume:
    """A [0, 1] volume on the atlas grid (a synthesized target) -> the native ``grid`` (a modality) or ``atlas``:
    B-spline through the inverse transform, clipped to [0, 1], 0 outside the brain mask on that grid."""
    if grid == "atlas":
        return Volume(np.where(study.atlas_mask, volume.data, 0.0).astype(np.float32), ATLAS_AFFINE.copy(),
                      dict(volume.meta))
    shape, affine = study.grids[grid]
    data = resample(volume, np.linalg.inv(study.to_native[grid]), shape, affine, "bspline")
    data = np.where(study.mask_on(grid), np.clip(data, 0.0, 1.0), 0.0).astype(np.float32)
    return Volume(data, affine.copy(), dict(volume.meta))
