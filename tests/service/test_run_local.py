"""`make run`'s supervisor as a new user meets it: bootstrap key, the printed curl example run as printed
(with a small step count), and the worker restarted after kill -9."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

from tests.service.conftest import ROOT, free_port


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_make_run_serves_the_printed_example_and_restarts_its_worker(tmp_path: Path, checkpoint: Path):
    port = free_port()
    var = tmp_path / "var"
    env = {**os.environ, "PORT": str(port), "MSGLDM_VAR_DIR": str(var),
           "MSGLDM_INFERENCE__CHECKPOINT": str(checkpoint)}
    proc = subprocess.Popen([sys.executable, "ops/run_local.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("Stop: Ctrl-C" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        key_file = var / "api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

        # run the example exactly as printed, only with 2 diffusion steps to keep the test short
        banner = "".join(lines)
        example = banner[banner.index("BASE="):banner.index("API docs:")]
        example = example.replace("-F targets=flair", "-F targets=flair -F steps=2")
        (tmp_path / "samples").symlink_to(ROOT / "samples")  # the example's relative paths, outside the repo
        result = subprocess.run(["bash", "-euc", example], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr + "".join(lines[-40:])
        assert '"status":"succeeded"' in result.stdout
        flair = nib.load(tmp_path / "flair.nii.gz")
        t1 = nib.load(ROOT / "samples/tcga-du-7294/TCGA-DU-7294_t1.nii.gz")
        assert flair.shape == t1.shape and np.allclose(flair.affine, t1.affine)

        # kill -9 the inference worker: the supervisor starts a new one (beside it: the training worker)
        celery = [p for p in child_pids(proc.pid) if "celery" in cmdline(p)]
        workers = [p for p in celery if " inference " in f" {cmdline(p)} "]
        assert len(celery) == 2 and len(workers) == 1, [cmdline(p) for p in celery]
        os.kill(workers[0], signal.SIGKILL)
        for pid in child_pids(workers[0]):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            new = [p for p in child_pids(proc.pid) if " inference " in f" {cmdline(p)} " and p != workers[0]]
            if new:
                break
            assert time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.5)
        assert any("restarting it" in line for line in lines)
        deadline = time.monotonic() + 120
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the restarted worker never became ready"
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(lines[-40:])
