"""Smoke tests of the benchmarks (ops/bench_inference.py, ops/bench_api.py) with tiny settings: they run, write
valid JSON, and the FLOP accounting is exact. Timings are never asserted: the benchmarks record them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BRATS = ROOT.parent / "shared" / "data" / "brats2023_gli_00001_000"
needs_brats = pytest.mark.skipif(not BRATS.is_dir(), reason=f"shared sample data not found at {BRATS}")


def load_ops(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "ops" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_brats
def test_bench_inference_writes_rows_and_counts_flops_exactly(tmp_path, one_thread):
    bench = load_ops("bench_inference")
    assert bench.main(["--preset", "tiny", "--steps", "1,3", "--max-slices", "1", "--repeats", "1", "--threads", "1",
                       "--small-peak", "--peak-repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "inference.json").read_text())
    assert [r["steps"] for r in rows] == [1, 3]
    for r in rows:
        assert r["device"] == "cpu" and r["preset"] == "tiny" and r["slices"] == 1 and r["repeats"] == 1
        assert r["seconds"] > 0 and r["flops"] > 0 and r["peak_flops_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["fraction_of_peak"] == pytest.approx(r["flops"] / r["seconds"] / r["peak_flops_per_s"], rel=1e-2)
        assert r["flops"] == sum(r["flops_by_phase"].values()) and r["flops_by_phase"]["decode"] > 0
        assert set(r["precision"]) == {"encode", "denoise", "decode"} and r["peak_gpu_mb"] is None
    assert rows[1]["flops_by_phase"]["denoise"] == 3 * rows[0]["flops_by_phase"]["denoise"] > 0
    assert rows[1]["flops_by_phase"]["encode"] == rows[0]["flops_by_phase"]["encode"] > 0

    # the extrapolation from the counted 2-step warm-up equals a direct count at 3 steps
    from model.checkpoint import init_checkpoint
    from model.pipeline import Synthesizer

    synth = Synthesizer.from_pretrained(init_checkpoint("tiny", tmp_path / "ck"), device="cpu")
    study = bench.brats_study(1)
    counted, _ = bench.counted_run(synth, study, 2)
    direct, _ = bench.counted_run(synth, study, 3)
    assert bench.flops_for(3, counted, 2) == direct
    assert direct == rows[1]["flops_by_phase"]


@needs_brats
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_bench_api_runs_and_writes_json(tmp_path):
    args = ["--duration", "1", "--submissions", "2", "--alternations", "1", "--queued", "20", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, "ops/bench_api.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "api-embedded.json").read_text())
    assert result["stack"] == "embedded"
    assert result["status_empty_queue"]["requests_per_s"] > 0 and result["status_empty_queue"]["non_2xx"] == 0
    assert result["status_long_queue"]["queued_jobs"] == 20 and result["status_long_queue"]["non_2xx"] == 0
    assert result["submission"]["status_codes"] == [202] and result["submission"]["count"] == 2
    assert result["memory"]["rss_before_submissions_mb"] > 0
    assert set(result["met"]) == {"status_rps", "status_p99", "submit_p95", "long_queue"}
    assert result["queue_position_query_s"]["newest_s"] > 0
    assert len(result["queue_alternating"]["newest"]["p50_ms"]) == 1
    cpu = result["status_empty_queue"]["cpu_ms_per_request"]  # where a request's CPU goes, by process
    assert set(cpu) == {"api", "postgres", "redis-server", "wrk"} and cpu["api"] > 0 and cpu["wrk"] > 0
    assert 0 < result["status_empty_queue"]["cpu_busy_share"] <= 1.05
