"""The training task: claim -> fetch the data and the last checkpoint -> ``python -m model.train`` in its own
process group (DDP over every GPU of the host via torchrun) -> upload stage checkpoints as they appear ->
``python -m model.evaluate`` against both baselines -> register a candidate model version -> complete.

Safe to run twice (the claim), resumable after a worker loss (the next attempt downloads the stage checkpoints
and ``model.train`` continues from them), and a cancel or crash frees the GPUs: the trainer is a separate process
group, killed as a whole on cancel and bound to the task's process by PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess  # nosec B404 - the trainer runs as a fixed argv, no shell
import sys
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from api.core import registry, training
from api.core.db import session_scope
from api.core.models import ModelVersion, TrainingRun, utcnow
from api.core.queue import TRAIN_TASK, publish_training
from api.core.settings import ROOT, get_settings
from api.core.storage import StorageError, download_prefix, get_storage, model_prefix, training_run_prefix
from worker import runtime
from worker.app import app

log = logging.getLogger(__name__)
# Runs the trainer with SIGKILL as its parent-death signal (Linux), then execs it: a worker killed with -9 takes
# its trainer (and the GPU memory it holds) with it.
GUARD = ("import ctypes, os, signal, sys\n"
         "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\nexcept (AttributeError, OSError):\n"
         "    pass\nif os.getppid() != int(sys.argv[1]):\n    os._exit(70)\nos.execv(sys.argv[2], sys.argv[2:])\n")
EVAL_PROGRESS = 90  # training fills 0-90 %, evaluation and registration the rest


class RunStopped(Exception):
    """Cancel was requested, or this worker lost its claim (lease expired and the run moved on)."""


class TrainerFailed(RuntimeError):
    """The trainer or the evaluation exited with an error; the message ends with its log tail."""


def world_size(requested: int | None) -> int:
    """DDP processes: every GPU of the host (or ``requested`` of them); one process on a CPU-only host."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(1, min(requested or available, available)) if available else 1


class Monitor:
    """Follows the trainer's ``progress.json``: history, gates, stage and progress into the run row with each lease
    renewal (every second: renewal doubles as the cancel check); uploads changed stage checkpoints to storage."""

    def __init__(self, run: TrainingRun, claim: training.Claim, out: Path, console: Path) -> None:
        self.run_id, self.claim, self.out, self.console = run.id, claim, out, console
        self.stages: list[int] = run.params.get("stages") or [0, 1, 2]
        self.settings = get_settings().training
        self.prefix = training_run_prefix(run.id, "checkpoint")
        self.uploaded: dict[str, float] = {}
        self.last_upload = 0.0
        self.checkpoint: dict[str, Any] | None = run.checkpoint
        self.stage: str | None = None

    # ----------------------------------------------------------------------------- what the trainer wrote
    def trainer_progress(self) -> dict[str, Any]:
        """The trainer's own ``progress.json`` (model.train ``Run``); empty before it has written one."""
        try:
            return json.loads((self.out / "progress.json").read_text())
        except (OSError, ValueError):  # not written yet (the trainer replaces it atomically)
            return {}

    def progress(self, state: dict[str, Any]) -> tuple[str | None, int]:
        """The current stage and the run's percentage: training fills 0-EVAL_PROGRESS, each of the run's stages an
        equal share by the trainer's step / steps."""
        stages = state.get("stages") or {}
        done = 0.0
        for s in self.stages:
            entry = stages.get(str(s)) or {}
            done += 1.0 if entry.get("finished") else min(entry.get("step", 0) / max(entry.get("steps") or 1, 1), 1.0)
        current = state.get("stage")
        return (str(current) if current is not None else str(self.stages[0]),
                int(EVAL_PROGRESS * done / max(len(self.stages), 1)))

    def log_tail(self) -> str:
        if not self.console.is_file():
            return ""
        with self.console.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode(errors="replace")
        lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
        return "\n".join(lines[-self.settings.log_tail_lines:])

    # ----------------------------------------------------------------------------- checkpoints
    def upload_checkpoints(self, force: bool = False) -> None:
        """Stage checkpoints whose file changed since their last upload (at most every checkpoint_upload_seconds,
        unless ``force``), with the run's config, split and log so that the next attempt resumes from them."""
        if not force and time.monotonic() - self.last_upload < self.settings.checkpoint_upload_seconds:
            return
        changed = [p for p in sorted(self.out.glob("stage[0-9].pt")) if self.uploaded.get(p.name) != p.stat().st_mtime]
        if not changed:
            return
        storage = get_storage()
        for p in changed:
            mtime = p.stat().st_mtime
            storage.put_file(self.prefix + p.name, p)
            self.uploaded[p.name] = mtime
        for name in ("config.json", "split.json", "log.jsonl", "progress.json"):
            if (self.out / name).is_file():
                storage.put_file(self.prefix + name, self.out / name)
        self.last_upload = time.monotonic()
        self.checkpoint = {"stage": int(changed[-1].name[5]), "files": sorted(self.uploaded),
                           "uploaded_at": utcnow().isoformat()}

    # ----------------------------------------------------------------------------- the loop
    def renew(self, **values: Any) -> None:
        with session_scope() as session:
            ok = training.renew(session, self.claim, lease_seconds=self.settings.lease_seconds,
                                log_tail=self.log_tail(), checkpoint=self.checkpoint, **values)
        if not ok:
            raise RunStopped(self.run_id)

    def tick(self, stage: str | None = None) -> None:
        state = self.trainer_progress()
        current, progress = self.progress(state)
        self.upload_checkpoints()
        self.renew(stage=stage or current, progress=progress if stage is None else EVAL_PROGRESS,
                   history=state.get("history", []), gates=state.get("gates", {}))

    def follow(self, cmd: list[str], stage: str | None = None) -> None:
        """Run ``cmd`` in its own process group to its end, ticking every second; kill the group when stopped."""
        with self.console.open("ab") as console:
            console.write(f"\n$ {' '.join(cmd)}\n".encode())
            console.flush()
            argv = [sys.executable, "-c", GUARD, str(os.getpid()), *cmd]  # cmd: built from validated run parameters
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=console,  # nosec B603
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                try:
                    self.tick(stage)
                except RunStopped:
                    raise
                except Exception:  # noqa: BLE001 - the database or storage may be restarting; the lease has slack
                    log.warning("training run %s: progress update failed", self.run_id, exc_info=True)
        except BaseException:  # cancel, lost claim, soft time limit: the trainer and its GPU memory go now
            kill_group(proc)
            raise
        if proc.returncode != 0:
            raise TrainerFailed(f"{cmd[2] if len(cmd) > 2 else cmd[0]} exited with {proc.returncode}:\n"
                                f"{self.log_tail()}")


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the trainer's process group, SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


# ----------------------------------------------------------------------------------------------- steps


def _dataset_root(run: TrainingRun, workdir: Path) -> Path:
    if "prefix" in run.dataset:
        dest = workdir / "data"
        shutil.rmtree(dest, ignore_errors=True)
        prefix = run.dataset["prefix"]
        if not download_prefix(get_storage(), prefix, dest):
            raise TrainerFailed(f"no objects under the dataset prefix {prefix!r}")
        return dest
    return Path(run.dataset["path"])


def _base_checkpoint(version: str, workdir: Path) -> Path:
    with session_scope() as session:
        row = session.get(ModelVersion, version)
        prefix, local = (row.storage_prefix, row.local_path) if row else (None, None)
    if prefix:
        dest = workdir / "base"
        shutil.rmtree(dest, ignore_errors=True)
        download_prefix(get_storage(), prefix, dest)
        return dest
    if local:
        return Path(local)
    raise TrainerFailed(f"base version {version} is not registered")


def train_command(run: TrainingRun, data: Path, out: Path, stage: str, world: int, base: Path | None) -> list[str]:
    p = run.params
    args = ["-m", "model.train", "--preset", run.preset, "--stage", stage, "--data", str(data),
            "--layout", training.DATASET_LAYOUTS.get(run.dataset.get("layout", "auto"), "auto"), "--out", str(out)]
    if p.get("max_steps") is not None:
        steps = p["max_steps"] if isinstance(p["max_steps"], list) else [p["max_steps"]]
        args += ["--max-steps", ",".join(str(s) for s in steps)]
    if p.get("epochs") is not None:
        args += ["--epochs", str(p["epochs"])]
    if p.get("batch_size"):
        args += ["--batch-size", str(p["batch_size"])]
    if base is not None:
        args += ["--init", str(base)]
    threads = get_settings().training.threads
    if threads:
        args += ["--threads", str(threads)]
    if world > 1:  # torchrun sets RANK/WORLD_SIZE; model.train picks nccl on CUDA, gloo on CPU
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args[1:]]
    return [sys.executable, *args]


def evaluate_command(checkpoint: Path, data: Path, out: Path, layout: str) -> tuple[list[str], bool]:
    """model.evaluate on the run's validation split; a dataset too small for one (one subject) is evaluated
    in-sample on its training cases (flagged in the metrics)."""
    split = json.loads((checkpoint.parent / "split.json").read_text())
    cfg = get_settings().training
    cmd = [sys.executable, "-m", "model.evaluate", "--checkpoint", str(checkpoint), "--data", str(data),
           "--layout", layout, "--out", str(out), "--baselines", str(out / "baselines"),
           "--baseline-steps", str(cfg.baseline_steps)]
    in_sample = not split.get("val")
    cmd += ["--cases", *split["train"], "--train-cases", *split["train"]] if in_sample else ["--split", "val"]
    for flag, value in (("--steps", cfg.eval_steps), ("--max-slices", cfg.eval_max_slices),
                        ("--targets", cfg.eval_targets), ("--available", cfg.eval_available)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd, in_sample


def summarize(report: dict[str, Any], in_sample: bool) -> dict[str, Any]:
    """The registry's metrics: MSG-LDM and baseline PSNR/SSIM (paper 2D protocol) per target and on average;
    ``beats_baselines`` when the mean PSNR and the mean SSIM both exceed each baseline's."""
    summary = report["summary"]

    def cell(method: str, target: str) -> dict[str, float] | None:
        c = summary.get(method, {}).get(target, {}).get("all", {})
        if "paper_psnr" not in c:
            return None
        return {"psnr": round(c["paper_psnr"]["mean"], 4), "ssim": round(c["paper_ssim"]["mean"], 4)}

    def mean(cells: list[dict[str, float] | None]) -> dict[str, float] | None:
        cells_ = [c for c in cells if c]
        if not cells_:
            return None
        return {k: round(sum(c[k] for c in cells_) / len(cells_), 4) for k in ("psnr", "ssim")}

    targets = sorted(summary.get("msgldm", {}))
    per_target = {t: c for t in targets if (c := cell("msgldm", t))}
    overall = mean(list(per_target.values()))
    baselines = {b: m for b in ("nearest", "unet") if (m := mean([cell(b, t) for t in targets]))}
    beats = bool(overall and baselines) and all(
        overall["psnr"] > b["psnr"] and overall["ssim"] > b["ssim"] for b in baselines.values())  # type: ignore[index]
    return {"per_target": per_target, "mean": overall or {}, "baselines": baselines, "beats_baselines": beats,
            "protocol": "paper 2D (model.evaluate): PSNR/SSIM over brain slices, mean over cases and input subsets",
            "cases": report.get("cases", []), "in_sample": in_sample, "steps": report.get("steps")}


def register(run: TrainingRun, checkpoint: Path, metrics: dict[str, Any]) -> str:
    """Upload the checkpoint under models/<version>/ and register it as a candidate."""
    from model.checkpoint import checkpoint_version

    version = checkpoint_version(checkpoint)
    prefix = model_prefix(version)
    storage = get_storage()
    for f in sorted(checkpoint.iterdir()):
        if f.is_file():
            storage.put_file(prefix + f.name, f)
    config = json.loads((checkpoint / "config.json").read_text())
    with session_scope() as session:
        registry.register_candidate(session, version=version, storage_prefix=prefix, preset=run.preset,
                                    modalities=list(config.get("modalities") or []), metrics=metrics,
                                    training_run_id=run.id, base_version=run.params.get("base_version"))
    return version


# ----------------------------------------------------------------------------------------------- the task


def run_training(run_id: str) -> str:
    """Run one training run to an end state; returns what happened (for logs and tests)."""
    settings = get_settings()
    with session_scope() as session:
        claim = training.claim(session, run_id, worker_id=runtime.worker_id(),
                               lease_seconds=settings.training.lease_seconds,
                               max_attempts=settings.training.max_attempts)
        run = session.get(TrainingRun, run_id) if claim else None
        if run is not None:
            session.expunge(run)
    if claim is None or run is None:
        log.info("training run %s: not claimable (finished, cancelled or held elsewhere)", run_id)
        return "skipped"
    workdir = settings.training.work_dir / run_id
    out, console = workdir / "out", workdir / "console.log"
    world = world_size(run.params.get("gpus"))
    monitor = Monitor(run, claim, out, console)
    try:
        # storage holds the truth of a run's progress: start from its checkpoints (none on the first attempt)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        resumed = len(download_prefix(get_storage(), training_run_prefix(run_id, "checkpoint"), out))
        monitor.uploaded = {p.name: p.stat().st_mtime for p in out.glob("stage[0-9].pt")}
        log.info("training run %s attempt %d on %d process(es)%s", run_id, claim.attempt, world,
                 f", resuming from {resumed} checkpoint files" if resumed else "")
        monitor.renew(stage=str(run.params.get("stages", [0])[0]), progress=0)
        data = _dataset_root(run, workdir)
        base = _base_checkpoint(run.params["base_version"], workdir) if run.params.get("base_version") else None
        stages = run.params.get("stages") or [0, 1, 2]
        for stage in ["all"] if stages == [0, 1, 2] else [str(s) for s in stages]:
            monitor.follow(train_command(run, data, out, stage, world, base))
        monitor.upload_checkpoints(force=True)
        monitor.tick()

        layout = training.DATASET_LAYOUTS.get(run.dataset.get("layout", "auto"), "auto")
        cmd, in_sample = evaluate_command(out / "model", data, workdir / "evaluation", layout)
        shutil.rmtree(workdir / "evaluation", ignore_errors=True)
        monitor.follow(cmd, stage="evaluate")
        report_path = workdir / "evaluation" / "report.json"
        report = json.loads(report_path.read_text())
        for name in ("report.json", "report.md"):
            get_storage().put_file(training_run_prefix(run_id, "evaluation") + name, workdir / "evaluation" / name)
        metrics = summarize(report, in_sample) | {"report": training_run_prefix(run_id, "evaluation") + "report.json"}
        version = register(run, out / "model", metrics)
        with session_scope() as session:
            state = monitor.trainer_progress()
            done = training.complete(session, claim, model_version=version, stage=None, log_tail=monitor.log_tail(),
                                     history=state.get("history", []), gates=state.get("gates", {}))
        log.info("training run %s: %s (candidate %s)", run_id, "succeeded" if done else "stale", version)
        if done:
            shutil.rmtree(workdir, ignore_errors=True)
        return "succeeded" if done else "stale"
    except RunStopped:
        with session_scope() as session:
            cancelled = training.mark_cancelled(session, claim, log_tail=monitor.log_tail())
        log.info("training run %s stopped (%s)", run_id, "cancelled" if cancelled else "claim lost")
        if cancelled:
            shutil.rmtree(workdir, ignore_errors=True)
        return "cancelled" if cancelled else "stale"
    except SoftTimeLimitExceeded:
        return _fail(claim, monitor, "time_limit", "the training run ran past its time limit")
    except StorageError as exc:
        return _fail(claim, monitor, "storage_unavailable", str(exc), retry=True)
    except TrainerFailed as exc:
        return _fail(claim, monitor, "training_error", str(exc))
    except Exception as exc:
        log.exception("training run %s failed", run_id)
        return _fail(claim, monitor, "training_error", f"{type(exc).__name__}: {exc}")


def _fail(claim: training.Claim, monitor: Monitor, code: str, message: str, retry: bool = False) -> str:
    return runtime.end_attempt(training.LEASES, claim, code=code, message=message[-4000:], retry=retry,
                               max_attempts=get_settings().training.max_attempts, publish=publish_training,
                               log_tail=monitor.log_tail())


_limit = get_settings().training.time_limit_seconds


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, time_limit=_limit,
          soft_time_limit=max(_limit - 60, 1))
def train(run_id: str) -> None:
    """Celery entry point on the training queue: the message carries only the run id."""
    run_training(run_id)
