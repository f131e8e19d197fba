"""The tables of an evaluation (``model.evaluate``): per-volume results summarised by method, target and M-bar,
the Table-1-style markdown report, and pooling several reports (cross-validation folds) into one."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.errors import EvaluationError

METHOD_LABELS = {"msgldm": "MSG-LDM", "nearest": "Nearest modality", "unet": "Regression U-Net"}
TABLE_TARGET_ORDER = ("t1", "t2", "t1ce", "flair", "pd")


def summarize(results: Sequence[dict]) -> dict:
    """``summary[method][target][n_available | "all"][metric] = {"mean", "std", "n"}`` over volumes."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["target"], str(r["n_available"]))].append(r)
        groups[(r["method"], r["target"], "all")].append(r)
    summary: dict = {}
    for (method, target, n), rows in sorted(groups.items()):
        metrics = sorted({k for r in rows for k, v in r.items() if isinstance(v, float | int)
                          and not isinstance(v, bool) and k not in ("n_available", "job_targets")})
        cell = {}
        for k in metrics:
            vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
            cell[k] = {"mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size)}
        summary.setdefault(method, {}).setdefault(target, {})[n] = cell
    return summary


def _fmt(cell: dict | None, key: str, scale: float = 1.0, digits: int = 2, std: bool = True) -> str:
    if not cell or key not in cell:
        return "-"
    c = cell[key]
    text = f"{c['mean'] * scale:.{digits}f}"
    return f"{text} ± {c['std'] * scale:.{digits}f}" if std and c["n"] > 1 else text


def markdown_report(report: dict) -> str:
    """Table-1-style markdown: rows (M-bar, method), columns per target."""
    summary = report["summary"]
    methods = [m for m in ("msgldm", "nearest", "unet") if m in summary] + \
              [m for m in summary if m not in ("msgldm", "nearest", "unet")]
    targets = [t for t in TABLE_TARGET_ORDER if any(t in summary[m] for m in methods)]
    ns = sorted({n for m in methods for t in summary[m] for n in summary[m][t] if n != "all"}, key=int) + ["all"]
    has_dice = any("dice_mean" in summary[m][t].get(n, {}) for m in methods for t in summary[m] for n in ns)
    has_tumour = any("brasyn_ssim_tumour" in summary[m][t].get(n, {}) for m in methods for t in summary[m] for n in ns)
    lines = [f"# Synthesis quality: {report.get('title', 'evaluation')}", ""]
    lines += [f"- checkpoint: `{report.get('checkpoint')}` ({report.get('version', '?')})",
              f"- cases: {', '.join(report.get('cases', []))}",
              f"- sampling steps: {report.get('steps')}, seed {report.get('seed')}"
              + (f", {report['max_slices']} central axial slices per volume" if report.get("max_slices") else "")
              + (f"; test-time views (model.slices.test_time_views): MSG-LDM {views['msgldm']}"
                 + (f", U-Net {views['unet']}" if views.get("unet") else "")
                 if (views := report.get("test_time_views")) else ""),
              f"- command: `{report.get('command', '')}`", ""]
    if report.get("notes"):
        lines += [f"- {n}" for n in report["notes"]] + [""]

    def table(title: str, cols: list[tuple[str, str, float, int]]) -> None:
        head = ["M̄", "Method"] + [f"{t.upper()} {c[0]}" for t in targets for c in cols]
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for n in ns:
            for m in methods:
                row = [n, METHOD_LABELS.get(m, m)]
                for t in targets:
                    cell = summary[m].get(t, {}).get(n)
                    row += [_fmt(cell, key, scale, digits) for _, key, scale, digits in cols]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    paper_cols = [("PSNR", "paper_psnr", 1.0, 2), ("SSIM %", "paper_ssim", 100.0, 2)]
    if has_dice:
        paper_cols.append(("Dice", "dice_mean", 1.0, 3))
    table("Paper protocol (2D slices, [0, 1], data_range 1)", paper_cols)
    brasyn_cols = [("SSIM3D %", "brasyn_ssim", 100.0, 2), ("PSNR brain", "brasyn_psnr", 1.0, 2)]
    if has_tumour:
        brasyn_cols[1:1] = [("SSIM tumour %", "brasyn_ssim_tumour", 100.0, 2),
                            ("SSIM non-tumour %", "brasyn_ssim_non_tumour", 100.0, 2)]
    table("BraSyn protocol (3D, per-volume percentile normalisation)", brasyn_cols)
    if report.get("ceiling"):
        parts = [f"{t.upper()} {_fmt(report['ceiling'][t].get('all'), 'brasyn_ssim', 100.0, 2, std=False)}"
                 for t in targets if t in report["ceiling"]]
        lines += ["Ceiling of this protocol for outputs in the model's [0, 1] scale (the reference itself, "
                  "normalised like the model's output, then scored): SSIM3D % " + ", ".join(parts) + ".", ""]
    if report.get("autoencoder_ceiling"):
        ae = report["autoencoder_ceiling"]
        parts = [f"{t.upper()} {_fmt(ae[t].get('all'), 'paper_psnr', 1.0, 2, std=False)} / "
                 f"{_fmt(ae[t].get('all'), 'paper_ssim', 100.0, 2, std=False)}" for t in targets if t in ae]
        lines += ["Autoencoder ceiling (each reference through the checkpoint's own autoencoder, no diffusion: what "
                  "MSG-LDM would score with a perfect stage 2), paper protocol PSNR / SSIM %: " + ", ".join(parts)
                  + ".", ""]
    table("MAE (brain, [0, 1]) and wall time per synthesized volume (s)",
          [("MAE", "mae", 1.0, 4), ("s/vol", "seconds", 1.0, 2)])
    if has_dice:
        predicted = report.get("seg_predicted_cases")
        if predicted:
            against = (" against each case's labels: expert labels, except " + ", ".join(predicted)
                       + " (a *predicted* segmentation, BraTS-Toolkit fusion)")
        elif report.get("seg_is_prediction"):  # reports written before seg_predicted_cases existed
            against = " against a *predicted* segmentation (BraTS-Toolkit fusion), not expert truth"
        else:
            against = " against the expert labels"
        lines += ["Dice: the checkpoint's structure-model segmentation of the available + synthesized inputs, "
                  "mean of WT, TC, ET" + against + "; cases without labels have none.", ""]
    lines += per_case_table(report.get("results", []), methods, targets)
    if report.get("figures"):
        lines += ["## Figures", ""] + [f"![{t}]({p})" for t, p in report["figures"].items()] + [""]
    return "\n".join(lines)


def per_case_table(results: Sequence[dict], methods: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Markdown lines: each case at the largest M-bar of the results, per method and target the 2D PSNR / SSIM %
    and the brain's mean intensity of the output against the reference's (where a method loses on one case only,
    or by its level rather than its structure, this shows it). Empty without results."""
    if not results:
        return []
    top = max(int(r["n_available"]) for r in results)
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    cases: list[str] = []
    for r in results:
        if int(r["n_available"]) == top:
            cells[(r["case"], r["method"], r["target"])].append(r)
            if r["case"] not in cases:
                cases.append(r["case"])

    def cell(rows: list[dict]) -> str:
        if not rows:
            return "-"
        text = (f"{np.mean([r['paper_psnr'] for r in rows]):.2f} / "
                f"{100 * np.mean([r['paper_ssim'] for r in rows]):.2f}")
        if all("brain_mean" in r for r in rows):
            text += (f" / {np.mean([r['brain_mean'] for r in rows]):.2f} vs "
                     f"{np.mean([r['brain_mean_reference'] for r in rows]):.2f}")
        return text

    head = ["Case", "Method"] + [t.upper() for t in targets]
    lines = [f"## Per case (M̄ = {top}): 2D PSNR / SSIM % / brain mean intensity, output vs reference", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        for m in methods:
            if any((case, m, t) in cells for t in targets):
                lines.append("| " + " | ".join([case, METHOD_LABELS.get(m, m)]
                                               + [cell(cells.get((case, m, t), [])) for t in targets]) + " |")
    return lines + [""]


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def merge_reports(paths: Sequence[str | Path], out: str | Path, title: str | None = None) -> dict:
    """Pool several reports (e.g. the folds of a cross-validation) into one: results concatenated, summary and
    ceiling recomputed, each fold's checkpoint and command kept. Writes ``report.json`` and ``report.md``."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    if not reports:
        raise EvaluationError("merge needs at least one report.json")
    results = [{**r, "fold": i} for i, rep in enumerate(reports) for r in rep["results"]]

    def pooled(key: str, method: str) -> dict:  # the folds' per-target means, averaged
        rows = [{"target": t, "method": method, "n_available": 0,
                 **{k: v["mean"] for k, v in cells.get("all", {}).items()}}
                for rep in reports for t, cells in rep.get(key, {}).items()]
        return summarize(rows).get(method, {})

    merged = {
        "title": title or "merged: " + "; ".join(r.get("title", "") for r in reports),
        "checkpoint": ", ".join(str(r.get("checkpoint")) for r in reports),
        "version": ", ".join(str(r.get("version")) for r in reports),
        "command": " ; ".join(r.get("command", "") for r in reports),
        "cases": [c for r in reports for c in r.get("cases", [])],
        "folds": [{k: r.get(k) for k in ("checkpoint", "version", "command", "cases", "baseline_train_cases",
                                          "steps", "test_time_views", "max_slices", "wall_seconds")}
                  for r in reports],
        "seg_is_prediction": any(r.get("seg_is_prediction") for r in reports),
        "seg_predicted_cases": sorted({c for r in reports for c in r.get("seg_predicted_cases", [])}),
        "steps": reports[0].get("steps"),
        "test_time_views": reports[0].get("test_time_views"),
        "seed": reports[0].get("seed"),
        "max_slices": reports[0].get("max_slices"),
        "protocol": reports[0].get("protocol"),
        "results": results,
        "summary": summarize(results),
        "ceiling": pooled("ceiling", "ceiling"),
        "autoencoder_ceiling": pooled("autoencoder_ceiling", "autoencoder"),
        "figures": {},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from model.figures import input_dependence_figure

    if input_dependence_figure(results, out / "figures" / "input_dependence.png") is not None:
        merged["figures"]["input_dependence"] = "figures/input_dependence.png"
    (out / "report.json").write_text(json.dumps(merged, indent=1, default=json_default))
    (out / "report.md").write_text(markdown_report(merged))
    return merged
