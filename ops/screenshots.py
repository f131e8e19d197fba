"""Refresh the UI screenshots in docs/ui/ (1920x1080, headless Debian Chromium).

Runs the browser tests with MSGLDM_UI_SCREENSHOTS=docs/ui, so the pictures show exactly what the tests checked.
The job is made by the bundled model (model/default, 10 steps, 2 samples) rather than the tests' random weights,
so the images look like a real synthesis; the admin pages show the registry contract's example payloads until
the registry is merged. Needs PostgreSQL and Redis on 127.0.0.1, like the real-stack tests.

    .venv/bin/python ops/screenshots.py            # then commit docs/ui/*.png
"""

from __future__ import annotations

import os
import subprocess  # nosec B404 - fixed argv, no shell
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = {**os.environ, "MSGLDM_UI_SCREENSHOTS": str(ROOT / "docs" / "ui"),
           "MSGLDM_UI_CHECKPOINT": os.environ.get("MSGLDM_UI_CHECKPOINT", str(ROOT / "model" / "default")),
           "MSGLDM_UI_STEPS": os.environ.get("MSGLDM_UI_STEPS", "10"), "MSGLDM_UI_JOB_TIMEOUT": "1700",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "tests/ui", "-p", "no:cacheprovider"]
    return subprocess.call(cmd,  # nosec B603 - fixed argv
                           cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
