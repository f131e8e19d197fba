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
