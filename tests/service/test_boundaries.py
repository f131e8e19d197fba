"""Layer boundaries: the API loads no torch (it may use the model's torch-free modules: config, errors, data,
io), and no worker code; the listener and pulls make jobs without the web framework."""

import subprocess
import sys

from tests.service.conftest import ROOT


def test_api_does_not_import_torch():
    code = ("import sys, api.main, api.cli, api.core.jobs, api.datasets; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'worker', 'SimpleITK', 'deepbet')); "
            "assert not bad, bad; "
            "used = sorted(m for m in sys.modules if m.startswith('model')); "
            "assert set(used) <= {'model', 'model.config', 'model.errors', 'model.data', 'model.io', 'model.io.dicom', "
            "'model.io.volume', 'model.io.nifti', 'model.io.geometry'}, used")
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
