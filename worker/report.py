"""The quality report of a job: validation metrics (when a reference was uploaded), ``preview.png`` (a montage
of inputs | synthesized | uncertainty | reference in three orthogonal planes) and a self-contained ``report.html``.

Called once from ``worker.tasks._write_results``; it adds ``validation`` to the record before record.json is
written and returns the files it wrote (name -> local path), which the caller stores with the other results.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from api.core import results as result_names
from api.core.models import Job
from worker.native import JobResult

PLANES = ("axial", "coronal", "sagittal")
BANNER = "SYNTHETIC - not for primary diagnosis"
NATIVE = ("raw study: synthesized and acquired target on the output grid (the acquired one moved there by its rigid "
          "registration when that is another series' grid), brain = the deepbet mask mapped onto that grid, the "
          "acquired target masked to it; ")


def write_report(job: Job, result: JobResult, record: dict[str, Any], study: dict[str, Any], workdir: Path, *,
                 preprocess_cfg: Any, modalities: tuple[str, ...]) -> dict[str, Path]:
    """Score against references, draw the montage, write the HTML; returns ``{result name: local file}``.

    Validation metrics are the registry's (``model.protocols``, as ``python -m model.evaluate`` scores a model
    version): both protocols for a study on the model's grid (``preprocess_cfg``, ``modalities``: the serving
    model's), the BraSyn protocol (defined on the original grid) for a raw study on its output grid."""
    from model.io.nifti import write_nifti
    from model.io.volume import Volume
    from model.protocols import paper_reference

    t0 = time.perf_counter()
    inputs = {m: v for m, v in study.items() if m not in job.targets}
    references = {m: v for m, v in study.items() if m in job.targets}
    native_mask = result.brain_mask  # raw studies (worker/native.py): the mask on the output grid
    brain = native_mask if native_mask is not None else np.logical_or.reduce(
        [np.asarray(v.data) > 0 for v in study.values()])  # as model.evaluate: every volume of the case
    files: dict[str, Path] = {}
    normalized: dict[str, np.ndarray] = {}
    if references:
        acquired = {m: result.reference_arrays.get(m, ref.data) for m, ref in references.items()}
        normalized = {m: paper_reference(a, brain, preprocess_cfg.clip_percentiles)  # the model's [0, 1] scale
                      for m, a in acquired.items()}
        if native_mask is None:
            metrics, protocol = study_scores(result.volumes, normalized, acquired, study, brain, preprocess_cfg,
                                             modalities)
        else:
            metrics, protocol = native_scores(result.volumes, acquired, brain)
        record["validation"] = {"protocol": protocol, "metrics": metrics}
        for m, ref in normalized.items():
            name = result_names.name("reference", m)
            files[name] = write_nifti(Volume(ref.astype(np.float32), result.volumes[m].affine, {}), workdir / name)
    files[result_names.PREVIEW] = workdir / result_names.PREVIEW
    files[result_names.PREVIEW].write_bytes(result.preview_png or montage(inputs, result, normalized))
    record.setdefault("timings_seconds", {})["report"] = time.perf_counter() - t0
    files[result_names.REPORT] = workdir / result_names.REPORT
    page = report_html(record, files[result_names.PREVIEW].read_bytes())
    files[result_names.REPORT].write_text(page, encoding="utf-8")
    return files


def study_scores(volumes: dict[str, Any], normalized: dict[str, np.ndarray], acquired: dict[str, np.ndarray],
                 study: dict[str, Any], brain: np.ndarray, preprocess_cfg: Any, modalities: tuple[str, ...]
                 ) -> tuple[dict[str, dict[str, float]], str]:
    """Both protocols of ``model.protocols`` per target, on the model's grid: the numbers of ``model.evaluate``
    (``normalized``: each reference by ``paper_reference``, ``acquired``: as uploaded)."""
    from model.protocols import BRASYN, PAPER, brasyn_protocol, brasyn_reference, paper_protocol, paper_window

    window = paper_window(study, modalities, preprocess_cfg)
    metrics = {}
    for m, reference in normalized.items():
        pred = np.asarray(volumes[m].data, dtype=np.float64)
        metrics[m] = _rounded({**paper_protocol(pred, reference, brain, window),
                               **brasyn_protocol(pred, brasyn_reference(acquired[m]), brain)})
    return metrics, f"{PAPER}; {BRASYN}"


def native_scores(volumes: dict[str, Any], acquired: dict[str, np.ndarray], brain: np.ndarray
                  ) -> tuple[dict[str, dict[str, float]], str]:
    """The BraSyn protocol per target of a raw study, on its output grid. BraSyn's volumes are skull-stripped, the
    acquired target is not: it is masked to the brain first (as the synthesis is), else the skull and fat would
    set its percentile normalisation."""
    from model.protocols import BRASYN, brasyn_protocol, brasyn_reference

    metrics = {m: _rounded(brasyn_protocol(np.asarray(volumes[m].data, dtype=np.float64),
                                           brasyn_reference(np.where(brain, ref, 0.0)), brain))
               for m, ref in acquired.items()}
    return metrics, NATIVE + BRASYN


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: v if isinstance(v, int) else round(float(v), 5) for k, v in scores.items()}


def _canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The array reoriented to RAS+ (the viewer's convention), so that every volume is cut the same way."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(np.asarray(data, dtype=np.float32), ornt)


def _cuts(vol: np.ndarray, center: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through ``center`` of a RAS+ volume, as the web viewer shows them
    (radiological: the patient's right on the left; anterior / superior up; sagittal: anterior on the left)."""
    x, y, z = center
    return [np.flipud(vol[::-1, :, z].T), np.flipud(vol[::-1, y, :].T), np.flipud(vol[x, ::-1, :].T)]


def montage(inputs: dict[str, Any], result: Any, references: dict[str, np.ndarray]) -> bytes:
    """PNG bytes: one column per input, synthesized target, uncertainty map and reference; one row per plane."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    first = next(iter(result.volumes.values()))
    columns: list[tuple[str, np.ndarray, str]] = []  # (title, RAS volume, colour map)
    columns += [(f"input {m}", _canonical(v.data, v.affine), "gray") for m, v in inputs.items()]
    columns += [(f"SYNTHETIC {m}", _canonical(v.data, v.affine), "gray") for m, v in result.volumes.items()]
    columns += [(f"uncertainty {m}", _canonical(v.data, v.affine), "magma")
                for m, v in (result.uncertainty or {}).items()]
    columns += [(f"reference {m}", _canonical(v, first.affine), "gray") for m, v in references.items()]
    mask = columns[0][1] > 0
    center = tuple(int(round(c.mean())) for c in np.nonzero(mask)) if mask.any() else tuple(s // 2 for s in mask.shape)
    fig = Figure(figsize=(2.2 * len(columns), 6.9), dpi=100, facecolor="black")
    for col, (title, vol, cmap) in enumerate(columns):
        inside = vol[vol > 0]
        vmax = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        for row, cut in enumerate(_cuts(vol, center)):  # type: ignore[arg-type]
            ax = fig.add_subplot(3, len(columns), row * len(columns) + col + 1)
            ax.imshow(cut, cmap=cmap, vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, color="#ffb000" if title.startswith("SYNTHETIC") else "white", fontsize=10)
    fig.suptitle(BANNER, color="#ffb000", fontsize=12, fontweight="bold")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.03, hspace=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="black")
    return buf.getvalue()


def metrics_line(v: dict[str, float]) -> str:
    """One target's validation metrics as the report and the job page show them."""
    parts = []
    if "paper_psnr" in v:
        parts.append(f"paper 2D: PSNR {v['paper_psnr']:.2f} dB, SSIM {v['paper_ssim']:.4f}, MAE {v['mae']:.4f}")
    parts.append(f"BraSyn 3D: PSNR {v['brasyn_psnr']:.2f} dB, SSIM {v['brasyn_ssim']:.4f}")
    return "; ".join(parts)


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def report_html(record: dict[str, Any], preview_png: bytes) -> str:
    """A self-contained page (inline CSS and image): what was made, from what, how, how long, and how good."""
    timings = [(k, f"{v:.2f} s") for k, v in record.get("timings_seconds", {}).items()]
    checks = [(m, f"shape {i.get('shape')}, {i.get('bytes')} bytes, sha256 {str(i.get('sha256'))[:16]}..., "
                  f"non-finite voxels set to 0: {i.get('nonfinite_voxels_set_to_0', 0)}"
                  + (" (reference, withheld from the model)" if i.get("reference") else ""))
              for m, i in record.get("inputs", {}).items()]
    synthesis = record.get("synthesis", {})
    about = [("job", record.get("job_id")), ("attempt", record.get("attempt")),
             ("model version", record.get("model_version")), ("device", record.get("device")),
             ("seed", record.get("seed")), ("steps", record.get("steps")), ("samples", record.get("samples")),
             ("targets", ", ".join(record.get("targets", []))), ("reference modality", synthesis.get("reference"))]
    parts = [f"<h2>Job</h2>{_table(about)}", f"<h2>Input checks</h2>{_table(checks)}"]
    validation = record.get("validation")
    if validation:
        rows = [(m, metrics_line(v)) for m, v in validation["metrics"].items()]
        parts.append(f"<h2>Validation against the uploaded reference</h2>{_table(rows)}"
                     f"<p class=note>{html.escape(validation['protocol'])}</p>")
    pre = record.get("preprocessing") or {}
    if pre:
        pre_rows: list[tuple[str, Any]] = [("requested / ran", f"{pre.get('requested')} / {pre.get('mode')}"),
                                       ("why", "; ".join(pre.get("reasons") or [])
                                        or "BraTS-like: one grid, background 0, 1 mm")]
        if pre.get("mode") == "full":
            mask = pre.get("brain_mask", {})
            pre_rows += [("reference series", pre.get("reference_series")), ("output grid", pre.get("output_grid")),
                     ("brain mask", f"{mask.get('volume_ml')} mL, {mask.get('components')} component(s) "
                                    f"(deepbet {pre.get('versions', {}).get('deepbet')})")]
            pre_rows += [(t["name"], f"MI {t['mutual_information']}, " + (
                f"rotation {t['rotation_deg']} deg, max brain shift {t['max_brain_shift_mm']} mm, coverage "
                f"{t['brain_coverage']:.0%}" if "rotation_deg" in t else f"scales {t.get('scales')}"))
                for t in pre.get("transforms", [])]
            pre_rows += [(f"registration check {m}", f"normalised MI with the reference in the brain: {v}")
                     for m, v in (pre.get("registration_check") or {}).items()]
        parts.append(f"<h2>Preprocessing (raw study)</h2>{_table(pre_rows)}<p class=note>preview: atlas space, brain "
                     f"mask outline in yellow, reference edges in cyan over each registered series</p>")
    warnings = synthesis.get("warnings") or []
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    parts.append(f"<h2>Timings per phase</h2>{_table(timings)}")
    image = base64.b64encode(preview_png).decode()
    raw = html.escape(json.dumps(record, indent=2, default=str))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MSG-LDM report {html.escape(str(record.get("job_id")))}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #111; color: #eee; }}
main {{ max-width: 1400px; margin: 0 auto; padding: 0 24px 40px; }}
.banner {{ background: #ffb000; color: #000; font-weight: 700; text-align: center; padding: 10px; font-size: 18px; }}
table {{ border-collapse: collapse; margin: 8px 0; }} th, td {{ text-align: left; padding: 4px 14px 4px 0; }}
th {{ color: #aaa; font-weight: 500; }} img {{ max-width: 100%; }} .note, pre {{ color: #aaa; }}
pre {{ background: #1b1b1b; padding: 12px; overflow: auto; }}
</style></head>
<body><div class="banner" role="alert">{BANNER}</div><main>
<h1>MSG-LDM synthesis report</h1>
<img alt="montage: inputs, synthesized, uncertainty, reference in three planes" src="data:image/png;base64,{image}">
{"".join(parts)}
<details><summary>record.json</summary><pre>{raw}</pre></details>
</main></body></html>
"""
