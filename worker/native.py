"""A job's ``preprocess`` and ``output_grid`` options: raw studies through :mod:`model.native` around the model.

``auto`` runs today's path unchanged when :func:`model.native.assess` finds the study BraTS-like, else ``full``;
``none`` always runs today's path; ``full`` brings the study into the atlas space, synthesizes there and maps the
result onto ``output_grid`` (``reference``: the chain's reference series, a supplied modality's name, or
``atlas``). The result carries what the report needs: the brain mask on the output grid, the acquired references
on that grid (validation mode) and a preview with the mask outline and the registration check.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.io.volume import Volume


@dataclass
class JobResult:
    """What one synthesis hands to the result writers and the report: the model's
    :class:`model.pipeline.SynthesisResult` fields, plus, for a raw study, what the report needs of the chain."""

    volumes: dict[str, Volume]
    uncertainty: dict[str, Volume] | None
    timings: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    brain_mask: np.ndarray | None = None  # on the output grid
    reference_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # acquired targets on the output grid
    preview_png: bytes | None = None
    overlays: dict[str, Volume] = field(default_factory=dict)  # api.core.results.OVERLAYS, on the output grid
    native: Any = None  # the model.native.NativeStudy (atlas-space inputs, transforms)



def run(synth: Any, study: dict[str, Volume], targets: list[str], *, preprocess: str, output_grid: str,
        progress: Callable[[str, float], None], **kwargs: Any) -> tuple[JobResult, dict[str, Any]]:
    """Synthesize ``targets`` from ``study`` (references included: they are withheld from the model) and return the
    result and the record's ``preprocessing`` section."""
    from model import native

    given = {m: v for m, v in study.items() if m not in targets}
    brats_like, reasons = native.assess(given)
    mode = preprocess if preprocess != "auto" else ("none" if brats_like else "full")
    decision = {"requested": preprocess, "mode": mode, "brats_like": brats_like, "reasons": reasons,
                "output_grid": output_grid}
    if mode == "none":
        inner = synth.synthesize(given, targets, progress=progress, **kwargs)
        result = JobResult(inner.volumes, inner.uncertainty, inner.timings, inner.meta)
        if output_grid != "reference":
            decision["note"] = f"output_grid {output_grid!r} ignored: without preprocessing every output lies on " \
                               f"the reference input's grid"
        return result, decision
    return _full(synth, study, given, targets, output_grid, progress, decision, **kwargs)


def _full(synth: Any, study: dict[str, Volume], given: dict[str, Volume], targets: list[str], output_grid: str,
          progress: Callable[[str, float], None], decision: dict[str, Any], **kwargs: Any) -> tuple[JobResult, dict]:
    from model import native
    from model.brain_extraction import describe, extract_brain

    progress("preprocess", 0.0)
    # the validation references are registered too (their grid may be asked for), never given to the model
    ns = native.to_atlas(given | {m: v for m, v in study.items() if m in targets}, extract_brain,
                         reference=native.choose_reference(given), progress=lambda phase, f: progress(phase, 0.1 * f))
    grid = ns.reference if output_grid == "reference" else output_grid
    if grid != "atlas" and grid not in ns.grids:
        raise ValueError(f"output_grid {output_grid!r} is not a supplied series ({', '.join(ns.grids)})")
    atlas_inputs = {m: ns.atlas_volumes[m] for m in given}
    inner = synth.synthesize(atlas_inputs, targets, progress=progress, **kwargs)
    volumes = {t: native.from_atlas(v, ns, grid) for t, v in inner.volumes.items()}
    uncertainty = {t: native.from_atlas(v, ns, grid) for t, v in (inner.uncertainty or {}).items()} or None
    mask = ns.mask_on(grid)
    out_shape, out_affine = ns.grids[grid] if grid != "atlas" else (native.ATLAS_SHAPE, native.ATLAS_AFFINE)
    to_atlas = np.eye(4) if grid == "atlas" else np.linalg.inv(ns.to_native[grid])  # output point -> atlas point

    def on_output_grid(m: str) -> np.ndarray:
        """Series ``m`` (as acquired) on the output grid, through its registration; itself when it is that grid."""
        if m == grid:
            return study[m].data
        return native.resample(study[m], ns.to_native[m] @ to_atlas, out_shape, out_affine)

    references = {t: on_output_grid(t) for t in targets if t in study}
    meta = {**inner.meta, "reference": grid if grid != "atlas" else ns.reference, "output_grid": grid,
            "model_grid": "atlas (SRI24, 240x240x155, 1 mm)"}
    record = {**decision, **ns.record, "output_grid": grid,
              "output": native.grid_record(out_shape, out_affine, grid),
              "brain_extraction": describe()}
    record["brain_mask"]["output_grid_voxels"] = int(mask.sum())
    record["versions"] |= {"deepbet": describe()["version"]}
    record["registration_check"] = registration_check(ns)
    preview = preview_png(ns, inner, atlas_inputs)
    reference_on_grid = np.asarray(on_output_grid(ns.reference), dtype=np.float32)
    overlays = {"brain_mask.outline": Volume(outline(mask), out_affine.copy(), {}),
                "registration.edges": Volume(edges3d(reference_on_grid, mask), out_affine.copy(), {})}
    return JobResult(volumes, uncertainty, {**inner.timings, "preprocess": ns.record["timings_seconds"]["total"]},
                     meta, mask, references, preview, overlays, ns), record


def outline(mask: np.ndarray) -> np.ndarray:
    """The in-plane boundary of a mask, slice by slice along the last axis (uint8 0/1): drawn over a slice it is
    a contour, not a filled region."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, structure=np.array([[[0], [1], [0]], [[1], [1], [1]], [[0], [1], [0]]],
                                                            dtype=bool))
    return (mask & ~inner).astype(np.uint8)


def edges3d(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Strong in-plane edges of ``image`` within ``mask`` (uint8 0/1): the in-plane gradient magnitude of the image
    as it is (not masked: the mask's own border is no edge of the anatomy) above its 90th percentile inside the
    mask eroded by 2 voxels, slice by slice."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3, 1), dtype=bool), iterations=2)
    return np.stack([_edges(image[..., k], inner[..., k]) & inner[..., k] for k in range(image.shape[2])],
                    axis=-1).astype(np.uint8)


def _edges(a: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Strong edges of a 2D image: gradient magnitude above its 90th percentile inside ``region`` (default a > 0)."""
    from scipy import ndimage

    g = np.hypot(ndimage.sobel(a, 0), ndimage.sobel(a, 1))
    inside = g[region if region is not None else a > 0]
    return g > (np.percentile(inside, 90) if inside.size else np.inf)


def registration_check(ns: Any) -> dict[str, float]:
    """Per registered series: normalised mutual information (H(a) + H(b)) / H(a, b) with the reference in the atlas
    brain mask: 1 for independent images, 2 for identical ones; the Philips study's T2 and FLAIR against its 3D T1
    give 1.08 and 1.11."""
    ref = ns.atlas_volumes[ns.reference].data[ns.atlas_mask]
    out = {}
    for m, v in ns.atlas_volumes.items():
        if m == ns.reference:
            continue
        h, _, _ = np.histogram2d(ref, v.data[ns.atlas_mask], bins=32)
        p = h / h.sum()
        px, py = p.sum(1), p.sum(0)

        def entropy(q: np.ndarray) -> float:
            q = q[q > 0]
            return float(-(q * np.log(q)).sum())

        out[m] = round((entropy(px) + entropy(py)) / entropy(p.ravel()), 4)
    return out


def preview_png(ns: Any, inner: Any, atlas_inputs: dict[str, Volume]) -> bytes:
    """Atlas-space montage: each input with the brain-mask outline (yellow) and the reference's edges (cyan: the
    registration check, edges should sit on the same anatomy), then the synthesized targets; three planes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from worker.report import BANNER, _canonical, _cuts

    mask = _canonical(ns.atlas_mask.astype(np.float32), ns.atlas_volumes[ns.reference].affine) > 0.5
    ref = _canonical(ns.atlas_volumes[ns.reference].data, ns.atlas_volumes[ns.reference].affine)
    center = tuple(int(round(c.mean())) for c in np.nonzero(mask))
    columns = [(f"input {m}" + (" (reference)" if m == ns.reference else ""), _canonical(v.data, v.affine))
               for m, v in atlas_inputs.items()]
    columns += [(f"SYNTHETIC {m}", _canonical(v.data, v.affine)) for m, v in inner.volumes.items()]
    ref_cuts, mask_cuts = _cuts(ref, center), _cuts(mask.astype(np.float32), center)  # type: ignore[arg-type]
    fig = Figure(figsize=(2.4 * len(columns), 7.4), dpi=100, facecolor="black")
    for col, (title, vol) in enumerate(columns):
        inside = vol[vol > 0]
        vmax = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        for row, cut in enumerate(_cuts(vol, center)):  # type: ignore[arg-type]
            ax = fig.add_subplot(3, len(columns), row * len(columns) + col + 1)
            ax.imshow(cut, cmap="gray", vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
            ax.contour(mask_cuts[row], levels=[0.5], colors="#ffd000", linewidths=0.6)
            if not title.startswith(("SYNTHETIC", f"input {ns.reference}")):
                edges = np.ma.masked_where(~_edges(ref_cuts[row]), np.ones_like(cut))
                ax.imshow(edges, cmap=ListedColormap(["#00e5ff"]), alpha=0.6, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, color="#ffb000" if title.startswith("SYNTHETIC") else "white", fontsize=9)
    fig.suptitle(f"{BANNER}\natlas space: brain mask (yellow), {ns.reference} edges (cyan) over each registered "
                 f"series", color="#ffb000", fontsize=9, fontweight="bold")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.87, wspace=0.03, hspace=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="black")
    return buf.getvalue()
