"""The raw-study chain's time per study, and its quality on the Philips study (docs/benchmarks.md, docs/imaging.md).

    python ops/bench_preprocess.py [--repeats 1] [--threads 1] [--quality] [--out var/bench]

1. **Time** (``OUT/preprocess.json``): the real Philips study (``../shared/data/raw_philips_study``: 3D T1, T2,
   FLAIR and the later fat-saturated T1 SE as a fourth sequence) is read from DICOM, then
   :func:`model.native.to_atlas` runs on all four: 1 mm reference, deepbet, three rigid registrations, affine to
   SRI24, four resamplings into the atlas grid. Seconds per step and in all, the load average, threads.
2. **Quality** (``--quality``): what the API test does (tests/service/test_raw_study.py): FLAIR withheld, the
   shipped default model synthesizes it from T1 and T2 in atlas space at its default steps (seed 0), the result
   is mapped onto the FLAIR's grid and scored against the acquired FLAIR in the brain mask on that grid (the
   BraSyn protocol, as a job's report scores a raw study: worker.report.native_scores); beside it the
   nearest-modality baseline (fitted on the model's 16 training cases, metrics.json -> split) run on the same
   atlas-space inputs and mapped back the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PHILIPS = DATA / "raw_philips_study"
SERIES = {"t1": "T1W_3D_FFE__COR_CLEAR_501", "t2": "T2W_TSE_TRA_401", "flair": "T2W_FLAIR_TRA_701",
          "t1ce": "T1W_SE-TRA_FS_1201"}


def read_study(modalities: list[str]) -> dict:
    from model.io.dicom import read_series

    return {m: read_series(sorted((PHILIPS / SERIES[m]).iterdir())) for m in modalities}


def time_chain(repeats: int) -> dict:
    from model import native
    from model.brain_extraction import extract_brain

    t0 = time.perf_counter()
    study = read_study(list(SERIES))
    read = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        ns = native.to_atlas(study, extract_brain)
        runs.append({"seconds": round(time.perf_counter() - t, 2), "steps": ns.record["timings_seconds"],
                     "rigid": {tr["modality"]: tr["seconds"] for tr in ns.record["transforms"]
                               if tr["name"].startswith("rigid")}})
    return {"study": "raw_philips_study, 4 sequences (t1 3D, t2, flair, t1 SE FS 1201)", "read_dicom_seconds":
            round(read, 2), "runs": runs, "median_seconds": float(np.median([r["seconds"] for r in runs]))}


def quality() -> dict:
    from model import native
    from model.baselines import NearestModalityBaseline
    from model.data import find_cases
    from model.pipeline import Synthesizer
    from worker import native as worker_native
    from worker.report import native_scores

    study = read_study(["t1", "t2", "flair"])
    synth = Synthesizer.from_pretrained(ROOT / "model" / "default")
    t = time.perf_counter()
    result, record = worker_native.run(synth, study, ["flair"], preprocess="auto", output_grid="flair",
                                       progress=lambda *_: None, seed=0)
    seconds = time.perf_counter() - t
    reference, mask = result.reference_arrays["flair"], result.brain_mask
    model_scores = native_scores(result.volumes, {"flair": reference}, mask)[0]["flair"]
    split = json.loads((ROOT / "model" / "default" / "metrics.json").read_text())["split"]
    cases = [c for c in find_cases([DATA / "brats2018_deepbrainseg"]) if c.id in set(split["train"])]
    nearest = NearestModalityBaseline.fit(cases, synth.modalities)
    ns = result.native  # the same atlas-space inputs and transforms as the model's
    base_atlas = nearest.synthesize({m: ns.atlas_volumes[m] for m in ("t1", "t2")}, ["flair"])["flair"]
    base = native.from_atlas(base_atlas, ns, "flair")
    base_scores = native_scores({"flair": base}, {"flair": reference}, ns.mask_on("flair"))[0]["flair"]
    return {"model_version": synth.version, "steps": synth.default_steps, "seed": 0, "inputs": ["t1", "t2"],
            "target": "flair", "output_grid": "flair (256x256x26, 0.9x0.9x6 mm)", "seconds": round(seconds, 1),
            "msgldm": model_scores, "nearest_modality": {**base_scores, "source": nearest.source_for("flair",
                                                                                                  ["t1", "t2"])},
            "brain_mask_voxels_on_flair_grid": int(mask.sum()), "preprocessing": {
                k: record[k] for k in ("mode", "reference_series", "brain_mask", "transforms", "registration_check")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python ops/bench_preprocess.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch and ITK threads")
    p.add_argument("--quality", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "var" / "bench")
    args = p.parse_args(argv)
    if not PHILIPS.is_dir():
        print(f"the Philips study {PHILIPS} is absent", file=sys.stderr)
        return 2
    import SimpleITK as sitk  # noqa: N813
    import torch

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": args.threads, "load_before": os.getloadavg()},
           "command": "python " + " ".join(["ops/bench_preprocess.py", *(argv or sys.argv[1:])]),
           "chain": time_chain(args.repeats)}
    if args.quality:
        out["quality"] = quality()
    out["machine"]["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
