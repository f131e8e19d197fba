"""``make bench``: volume synthesis speed against this machine's measured peak, and quality against steps.

    python ops/bench_inference.py [--preset brats] [--steps 10,25,50,100] [--repeats 3] [--budget-minutes 22]
        [--device cuda|cpu] [--precision auto|fp32|bf16] [--max-slices N] [--quality] [--out var/bench]

1. **Speed** (``OUT/inference.json``, a list of rows): the preset with RANDOM weights (timing does not depend on
   them) synthesizes FLAIR from T1, T1CE and T2 of the shared BraTS case (every slice with brain) at each step
   count. The warm-up run (2 steps) runs under ``torch.utils.flop_counter.FlopCounterMode`` and gives the FLOPs
   of every phase (encoders, UNet steps, decoding); a run of ``s`` steps has the same encode/decode FLOPs and
   ``s / 2`` times the denoising FLOPs (every step is the same UNet forward on the same shapes; the smoke test
   checks this against a direct count). ``seconds`` is the median of the timed runs; on a CPU the
   number of repeats shrinks to fit ``--budget-minutes`` (each row says how many ran). The peak is measured in the
   same process, before and after, as the best of a 3x3 convolution (channels-last on CPU) and a square matmul
   in each dtype the synthesis uses; ``peak_flops_per_s`` weights the dtypes by the FLOPs each phase runs in them
   (the time the work would take at peak), and ``fraction_of_peak`` = ``flops / seconds / peak_flops_per_s``.
   ``peak_rss_mb`` is the process' resident-set high-water mark during the row (reset per row on Linux),
   ``peak_gpu_mb`` ``torch.cuda.max_memory_allocated``.
2. **Quality** (``--quality``, ``OUT/quality.json``): ``python -m model.evaluate`` with the shipped default model
   on both shared cases (3 inputs -> each missing target, 40-slice blocks) at each step count: mean 2D PSNR/SSIM,
   3D SSIM, MAE and seconds per synthesized block, so the default step count is chosen from data.

Both print a table. The load average is recorded with every row: the figures are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess  # nosec B404 - fixed argv, no shell
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model.checkpoint import init_checkpoint  # noqa: E402
from model.io.nifti import read_nifti  # noqa: E402
from model.io.volume import Volume  # noqa: E402
from model.pipeline import PRECISIONS, Synthesizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
BRATS = DATA / "brats2023_gli_00001_000"
TCGA = DATA / "tcga_du_7294_preprocessed"
INPUTS = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
TARGET = "flair"
PHASES = ("preprocess", "encode", "denoise", "decode", "postprocess")
STAGE_OF = {"preprocess": "encode", "encode": "encode", "denoise": "denoise", "decode": "decode",
            "postprocess": "decode"}  # the precision stage each phase's FLOPs run in


# ----------------------------------------------------------------------------------------------- machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, oneDNN primitive cache)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5, small: bool = False) -> dict:
    """Best FLOP/s of a 3x3 convolution and a square matmul in ``dtype`` on ``device``."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else (512 if small else 2048)
    b, c, hw = (64, 256, 96) if cuda else ((2, 64, 48) if small else (8, 128, 96))
    fmt = torch.contiguous_format if cuda else torch.channels_last
    with torch.inference_mode():
        a, m = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        mm = 2 * n**3 / _median_seconds(lambda: a @ m, device, repeats)
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(device, dtype).to(memory_format=fmt)
        x = torch.randn(b, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
        cv = 2 * b * c * c * 9 * hw * hw / _median_seconds(lambda: conv(x), device, repeats)
    return {"matmul": mm, "conv3x3": cv, "best": max(mm, cv)}


def reset_peak_memory(device: torch.device) -> None:
    with contextlib.suppress(OSError):  # Linux >= 4.0: writing 5 resets the process' peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def host() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------------------------- speed


def brats_study(max_slices: int | None = None) -> dict[str, Volume]:
    """T1, T1CE and T2 of the shared BraTS case (optionally a central block of axial slices)."""
    if not BRATS.is_dir():
        raise SystemExit(f"the shared BraTS case is not at {BRATS}")
    study = {}
    for m, suffix in INPUTS.items():
        v = read_nifti(BRATS / f"BraTS-GLI-00001-000-{suffix}.nii.gz")
        if max_slices:
            z0 = max(0, v.shape[2] // 2 - max_slices // 2)
            v = Volume(data=v.data[:, :, z0 : z0 + max_slices], affine=v.affine, meta=v.meta)
        study[m] = v
    return study


def counted_run(synth: Synthesizer, study: dict[str, Volume], steps: int) -> tuple[dict[str, int], dict[str, float]]:
    """One synthesis under FlopCounterMode: FLOPs per phase, and the run's phase timings."""
    flops = dict.fromkeys(PHASES, 0)
    state = {"phase": None, "mark": 0}
    with FlopCounterMode(display=False) as counter:

        def progress(phase: str, _fraction: float) -> None:
            if phase != state["phase"]:
                total = counter.get_total_flops()
                if state["phase"] is not None:
                    flops[state["phase"]] += total - state["mark"]
                state["phase"], state["mark"] = phase, total

        result = synth.synthesize(study, [TARGET], steps=steps, seed=0, progress=progress)
        flops[state["phase"]] += counter.get_total_flops() - state["mark"]
    sync(synth.device)
    return flops, result.timings


def flops_for(steps: int, counted: dict[str, int], counted_steps: int) -> dict[str, int]:
    """Per-phase FLOPs of a ``steps`` synthesis from a counted one (every step is the same UNet forward)."""
    return {p: f * steps // counted_steps if p == "denoise" else f for p, f in counted.items()}


def add_peaks(rows: list[dict], peaks: dict[torch.dtype, dict]) -> None:
    """``peak_flops_per_s``: the FLOPs over the time they would take at peak, each phase in its own dtype."""
    best = {str(d).removeprefix("torch."): v for d, v in peaks.items()}
    for row in rows:
        row["peak_by_dtype"] = best
        ideal = sum(f / best[row["precision"][STAGE_OF[p]]]["best"] for p, f in row["flops_by_phase"].items() if f)
        row["peak_flops_per_s"] = row["flops"] / ideal
        row["fraction_of_peak"] = row["flops"] / row["seconds"] / row["peak_flops_per_s"]


def run_speed(
    args: argparse.Namespace, device: torch.device, on_row: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """The speed rows; ``on_row(rows)`` after each (the file is rewritten, so a long run keeps what it has)."""
    study = brats_study(args.max_slices)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(args.preset, Path(tmp) / args.preset, seed=0)
        synth = Synthesizer.from_pretrained(ckpt, device=str(device), precision=args.precision)
    dtypes = synth.stage_dtypes
    load_before = os.getloadavg()
    print(f"measuring the peak on {device} ({', '.join(sorted({str(d) for d in dtypes.values()}))})", flush=True)
    peaks = {d: measure_peak(device, d, args.peak_repeats, args.small_peak) for d in set(dtypes.values())}

    # warm-up (oneDNN primitives / CUDA kernels for every shape) under the FLOP counter, 2 steps: the per-step
    # FLOPs are half the denoising phase's, every other phase's do not depend on the step count
    t0 = time.perf_counter()
    counted, warm = counted_run(synth, study, 2)
    fixed = time.perf_counter() - t0 - warm["denoise"]
    per_step = warm["denoise"] / 2
    print(f"warm-up and FLOP count (2 steps): {time.perf_counter() - t0:.1f} s", flush=True)

    budget_end = time.monotonic() + args.budget_minutes * 60
    rows = []
    for i, steps in enumerate(args.steps):
        est = fixed + per_step * steps  # the counted run is slower than plain ones: an upper estimate
        left = [fixed + per_step * s for s in args.steps[i:]]
        repeats = args.repeats
        if device.type == "cpu":
            repeats = max(1, min(args.repeats, int((budget_end - time.monotonic()) // max(sum(left), 1e-9))))
        reset_peak_memory(device)
        times, phases = [], []
        meta = {}
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            res = synth.synthesize(study, [TARGET], steps=steps, seed=0)
            sync(device)
            times.append(time.perf_counter() - start)
            phases.append(res.timings)
            meta = res.meta
        flops = flops_for(steps, counted, 2)
        total = sum(flops.values())
        seconds = statistics.median(times)
        row = {
            "device": str(device), "device_name": host()["gpu"] or host()["cpu"], "preset": args.preset,
            "precision": meta.get("precision"), "steps": steps, "slices": meta.get("slices"), "target": TARGET,
            "inputs": sorted(INPUTS), "seconds": round(seconds, 3), "seconds_runs": [round(t, 3) for t in times],
            "repeats": repeats, "estimated_seconds": round(est, 1),
            "phase_seconds": {p: round(statistics.median(ph[p] for ph in phases), 3) for p in PHASES},
            "flops": total, "flops_by_phase": flops, "achieved_flops_per_s": total / seconds,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "loadavg": [round(v, 2) for v in os.getloadavg()],
            "loadavg_start": [round(v, 2) for v in load_before], "torch": torch.__version__,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        rows.append(row)
        add_peaks(rows, peaks)
        if on_row is not None:
            on_row(rows)
        print(f"  {steps:>4} steps: {seconds:8.2f} s  ({total / seconds / 1e9:.0f} GFLOP/s, "
              f"{row['peak_rss_mb']:.0f} MB RSS, {repeats} run(s))", flush=True)
    after = {d: measure_peak(device, d, args.peak_repeats, args.small_peak) for d in set(dtypes.values())}
    # the better of the two peak measurements (before and after): the machine's capability, less its noise
    add_peaks(rows, {d: {k: max(v, after[d][k]) for k, v in peaks[d].items()} for d in peaks})
    return rows


def run_profile(args: argparse.Namespace, device: torch.device) -> str:
    """torch.profiler operator table of one 2-step synthesis of ``--profile-slices`` slices (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    study = brats_study(args.profile_slices)
    with tempfile.TemporaryDirectory() as tmp:
        synth = Synthesizer.from_pretrained(init_checkpoint(args.preset, Path(tmp) / "ck"), device=str(device),
                                            precision=args.precision)
    synth.synthesize(study, [TARGET], steps=2, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        res = synth.synthesize(study, [TARGET], steps=2, seed=0)
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    head = (f"{args.preset} preset, {res.meta['slices']} slices, 2 steps, {device}, precision "
            f"{res.meta['precision']}, threads {torch.get_num_threads()}, load average {os.getloadavg()}\n"
            f"phase seconds: { {k: round(v, 2) for k, v in res.timings.items()} }\n")
    return head + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=50)


def speed_table(rows: list[dict]) -> str:
    lines = ["| device | preset | steps | slices | seconds | TFLOP | achieved GFLOP/s | peak GFLOP/s | of peak "
             "| peak RSS MB | peak GPU MB | runs |", "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['preset']} | {r['steps']} | {r['slices']} | {r['seconds']:.2f} "
            f"| {r['flops'] / 1e12:.2f} | {r['achieved_flops_per_s'] / 1e9:.0f} | {r['peak_flops_per_s'] / 1e9:.0f} "
            f"| {r['fraction_of_peak']:.1%} | {r['peak_rss_mb']:.0f} | {r['peak_gpu_mb'] or '-'} | {r['repeats']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- quality


def run_quality(args: argparse.Namespace, out: Path) -> list[dict]:
    cases = [str(p) for p in (BRATS, TCGA) if p.is_dir()]
    if not cases:
        raise SystemExit(f"no shared cases under {DATA}")
    rows = []
    for steps in args.steps:
        dest = out / "quality" / f"steps-{steps}"
        cmd = [sys.executable, "-m", "model.evaluate", "--checkpoint", str(args.quality_checkpoint), "--data", *cases,
               "--split", "all", "--out", str(dest), "--max-slices", str(args.quality_slices), "--available", "3",
               "--no-baselines", "--no-dice", "--seed", "0", "--steps", str(steps)]
        if args.quality_targets:
            cmd += ["--targets", args.quality_targets]
        print(f"quality at {steps} steps: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # nosec B603
        report = json.loads((dest / "report.json").read_text())
        res = [r for r in report["results"] if r["method"] == "msgldm"]

        def mean(key: str, res: list[dict] = res) -> float:
            return round(float(np.mean([r[key] for r in res])), 4)

        rows.append({
            "steps": steps, "version": report["version"], "cases": report["cases"], "volumes": len(res),
            "slices_per_volume": args.quality_slices, "targets": sorted({r["target"] for r in res}),
            "paper_psnr": mean("paper_psnr"), "paper_ssim": mean("paper_ssim"), "brasyn_ssim": mean("brasyn_ssim"),
            "mae": mean("mae"),
            "seconds_per_volume": mean("seconds"), "loadavg": [round(v, 2) for v in os.getloadavg()],
            "threads": torch.get_num_threads(), "command": " ".join(["python", *cmd[1:]]),
        })
    return rows


def quality_table(rows: list[dict]) -> str:
    lines = ["| steps | 2D PSNR dB | 2D SSIM % | 3D SSIM % | MAE | s per volume (block) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['paper_psnr']:.2f} | {100 * r['paper_ssim']:.2f} "
                     f"| {100 * r['brasyn_ssim']:.2f} | {r['mae']:.4f} | {r['seconds_per_volume']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python ops/bench_inference.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="brats")
    p.add_argument("--steps", default="10,25,50,100", type=lambda s: [int(v) for v in s.split(",") if v])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per step count (median); CPU: fit the budget")
    p.add_argument("--budget-minutes", type=float, default=22.0, help="CPU: time for the timed runs")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-slices", type=int, default=None, help="a central block of axial slices (smoke tests)")
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--small-peak", action="store_true", help="small peak kernels (smoke tests)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--profile", action="store_true", help="also write OUT/profile-<device>.txt (torch.profiler)")
    p.add_argument("--profile-slices", type=int, default=8)
    p.add_argument("--quality", action="store_true", help="also the quality-vs-steps table (model.evaluate)")
    p.add_argument("--quality-checkpoint", type=Path, default=ROOT / "model" / "default")
    p.add_argument("--quality-slices", type=int, default=40)
    p.add_argument("--quality-targets", default=None, help="e.g. flair (default: every target)")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "bench")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"host: {json.dumps(host())}  load average: {os.getloadavg()}", flush=True)
    if not args.no_speed:
        def write(rows: list[dict]) -> None:
            ordered = sorted(rows, key=lambda r: r["steps"])
            (args.out / "inference.json").write_text(json.dumps(ordered, indent=1) + "\n")

        rows = sorted(run_speed(args, device, write), key=lambda r: r["steps"])
        write(rows)
        print(speed_table(rows))
        print(f"wrote {args.out / 'inference.json'}")
    if args.profile:
        table = run_profile(args, device)
        (args.out / f"profile-{device.type}.txt").write_text(table + "\n")
        print(table)
    if args.quality:
        qrows = run_quality(args, args.out)
        (args.out / "quality.json").write_text(json.dumps(qrows, indent=1) + "\n")
        print(quality_table(qrows))
        print(f"wrote {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
