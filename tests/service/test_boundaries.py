"""Layer boundaries: the API never imports torch or the model package."""

import subprocess
import sys

from tests.service.conftest import ROOT


def test_api_does_not_import_torch():
    code = ("import sys, api.main, api.cli, api.core.jobs; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model', 'worker')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_listener_and_pulls_make_jobs_without_fastapi():
    """The DICOM listener and a pull submit through api.submission / api.dicom, the same functions the route
    calls, without loading the web framework (or torch)."""
    code = ("import sys, worker.listener, worker.pacs, api.submission, api.dicom, api.core.keys; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'torch')); "
            "bad += [m for m in sys.modules if m.startswith(('api.routes', 'api.auth', 'api.errors'))]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
