"""One-off synthesis from NIfTI files.

    python -m model.synthesize --checkpoint model/default --input t1=a.nii.gz --input t2=b.nii.gz \
        --input t1ce=c.nii.gz --target flair --out out/ [--steps 25 --seed 0 --samples 4]

Writes ``OUT/<target>.nii.gz`` (float32 in [0, 1], the reference input's grid and affine), with ``samples > 1``
also ``OUT/<target>_std.nii.gz``, and prints a JSON summary (version, timings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model.io.nifti import read_nifti, write_nifti
from model.pipeline import PRECISIONS, Synthesizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.synthesize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--input", action="append", required=True, metavar="MODALITY=PATH")
    p.add_argument("--target", action="append", required=True, help="modality to synthesize (repeatable)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="compute dtype per stage (docs/model.md)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    study = {}
    for item in args.input:
        if "=" not in item:
            p.error(f"--input takes MODALITY=PATH, got {item!r}")
        mod, path = item.split("=", 1)
        study[mod] = read_nifti(path)
    targets = [t for item in args.target for t in item.split(",") if t]
    synth = Synthesizer.from_pretrained(args.checkpoint, device=args.device, precision=args.precision)

    def progress(phase: str, fraction: float) -> None:
        print(f"\r{phase:<12} {fraction:6.1%}", end="", file=sys.stderr, flush=True)

    result = synth.synthesize(study, targets, steps=args.steps, seed=args.seed, samples=args.samples, progress=progress)
    print(file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for mod, vol in result.volumes.items():
        written.append(str(write_nifti(vol, args.out / f"{mod}.nii.gz")))
    for mod, vol in (result.uncertainty or {}).items():
        written.append(str(write_nifti(vol, args.out / f"{mod}_std.nii.gz")))
    print(json.dumps({"written": written, "timings": result.timings, **result.meta}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
