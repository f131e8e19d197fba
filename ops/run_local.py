"""``make run``: the whole service on one machine with no servers, supervised.

Applies migrations, writes a bootstrap admin key to var/api-key (first start), starts the API on
127.0.0.1:$PORT, one Celery worker for inference and one for training runs, restarts either whenever it dies,
and prints a curl example
that submits the bundled sample study. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess  # nosec B404
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.cli import migrate  # noqa: E402
from api.core.db import session_scope  # noqa: E402
from api.core.models import Role  # noqa: E402
from api.core.settings import VAR, get_settings  # noqa: E402

SAMPLE = "samples/tcga-du-7294/TCGA-DU-7294"


def bootstrap_key() -> str:
    key_file = VAR / "api-key"
    if key_file.exists():
        return key_file.read_text().strip()
    from api.core.keys import create_key

    with session_scope() as session:
        _, plain = create_key(session, name="bootstrap admin (make run)", role=Role.admin)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(plain + "\n")
    print(f"wrote a bootstrap admin API key to {key_file} (mode 600)")
    return plain


def ensure_model(env: dict[str, str]) -> None:
    """Serve the bundled default model; if it is absent, a random tiny model built by model/ itself."""
    checkpoint = get_settings().inference.checkpoint
    if (checkpoint / "config.json").exists():
        return  # served at its own diffusion.default_steps (config.json)
    fallback = VAR / "models" / "tiny-random"
    if not (fallback / "config.json").exists():
        from model.checkpoint import init_checkpoint

        init_checkpoint("tiny", fallback)
    print(f"WARNING: no trained model at {checkpoint}; serving an UNTRAINED tiny model from {fallback}")
    env["MSGLDM_INFERENCE__CHECKPOINT"] = str(fallback)


def curl_example(port: int) -> str:
    key_file = VAR / "api-key"
    key_path = key_file.relative_to(ROOT) if key_file.is_relative_to(ROOT) else key_file
    auth = f'-H "Authorization: Bearer $(cat {key_path})"'
    return f"""
Try it (from {ROOT}): submit the sample study without its FLAIR, wait, download the synthesized FLAIR:

  BASE=http://127.0.0.1:{port}
  JOB=$(curl -sf {auth} -F t1=@{SAMPLE}_t1.nii.gz -F t1ce=@{SAMPLE}_t1c.nii.gz \\
        -F t2=@{SAMPLE}_t2.nii.gz -F targets=flair $BASE/api/v1/synthesize | sed -E 's/.*"id":"([^"]+)".*/\\1/')
  until curl -sf {auth} $BASE/api/v1/jobs/$JOB | grep -Eq '"status":"(succeeded|failed|cancelled)"'; do sleep 2; done
  curl -sf {auth} $BASE/api/v1/jobs/$JOB; echo
  curl -sf {auth} -o flair.nii.gz $BASE/api/v1/jobs/$JOB/results/flair.nii.gz && ls -l flair.nii.gz

API docs: $BASE/docs   Web UI: $BASE/ui/ (API key: the content of {key_path})   Stop: Ctrl-C
"""


def wait_ready(port: int, api: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Wait until the API answers and a worker has loaded the model, so the example works when printed."""
    import json
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and api.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:  # nosec B310
                if json.load(r).get("ready"):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(1)
    print("the service is not ready yet; see GET /readyz", file=sys.stderr)


def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    print(f"starting {name}: {' '.join(args)}", flush=True)
    return subprocess.Popen(args, cwd=ROOT, env=env)  # nosec B603


def main() -> int:
    VAR.mkdir(parents=True, exist_ok=True)
    get_settings().storage.local_root.mkdir(parents=True, exist_ok=True)
    port = int(os.environ.get("PORT", "8000"))
    migrate()
    bootstrap_key()
    env = dict(os.environ)
    ensure_model(env)
    py = sys.executable
    api_cmd = [py, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    worker_cmd = [py, "-m", "celery", "-A", "worker.app", "worker", "-Q", get_settings().broker.inference_queue,
                  "-c", "1", "--loglevel", "INFO", "-n", "local@%h"]
    trainer_cmd = [py, "-m", "celery", "-A", "worker.app", "worker", "-Q", get_settings().broker.training_queue,
                   "-c", "1", "--loglevel", "INFO", "-n", "local-trainer@%h"]
    commands = {"worker": worker_cmd, "trainer": trainer_cmd}  # supervised: restarted whenever they die
    if get_settings().dicom.listener_port is not None:  # the C-STORE listener (docs/pacs.md), owning jobs by a key
        if get_settings().dicom.listener_api_key is None:
            env["MSGLDM_DICOM__LISTENER_API_KEY_FILE"] = str(VAR / "api-key")  # the bootstrap key
        commands["listener"] = [py, "-m", "worker.listener"]
    procs = {"api": start("api", api_cmd, env)} | {name: start(name, cmd, env) for name, cmd in commands.items()}
    wait_ready(port, procs["api"])
    print(curl_example(port), flush=True)

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    restarts = 0
    while not stopping:
        time.sleep(1)
        if procs["api"].poll() is not None:
            print(f"the API exited with {procs['api'].returncode}; stopping", file=sys.stderr)
            break
        for name, cmd in commands.items():
            if procs[name].poll() is not None:
                restarts += 1
                print(f"the {name} exited with {procs[name].returncode}; restarting it (restart {restarts})",
                      file=sys.stderr, flush=True)
                procs[name] = start(name, cmd, env)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
