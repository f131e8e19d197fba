"""Browser-test fixtures: one real service (uvicorn + a Celery worker on PostgreSQL + Redis + an S3 server) per
module, and Debian's headless Chromium driven by Python playwright (no browser download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import Service, clear_caches, real_stack, running_service

CHROMIUM = os.environ.get("MSGLDM_TEST_CHROMIUM", "/usr/bin/chromium")
NIIVUE = Path(__file__).resolve().parents[2] / "api" / "ui" / "vendor" / "niivue.js"  # made by `make install`
# WebGL2 for NiiVue without a GPU: ANGLE on SwiftShader (Chromium's CPU renderer), asked for explicitly
SCREENSHOTS = os.environ.get("MSGLDM_UI_SCREENSHOTS")  # a folder: the tests also save the docs' screenshots there
CHECKPOINT = os.environ.get("MSGLDM_UI_CHECKPOINT")  # ops/screenshots.py: the bundled model instead of random weights


@pytest.fixture(scope="module")
def ui_service(checkpoint: Path, s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service on the real stack, shared by a module's browser tests (one job feeds several checks)."""
    stack = real_stack(Path(CHECKPOINT) if CHECKPOINT else checkpoint, s3_server)
    try:
        with running_service(stack, tmp_path_factory.mktemp("ui")) as svc:
            yield svc
    finally:
        clear_caches()
        for fn in stack.cleanup:
            fn()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian's `chromium` package (apt-get install chromium)."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    if not NIIVUE.is_file():
        pytest.skip(f"no NiiVue bundle at {NIIVUE} (make install runs npm ci for it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see pyproject dev extra)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--use-angle=swiftshader",
                                                                         "--enable-unsafe-swiftshader"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A 1920x1080 page (the reading-room size) that fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1920, "height": 1080}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    yield page
    context.close()
    assert not errors, f"script errors in the page: {errors}"


def screenshot(page, name: str) -> None:
    """Save a docs screenshot when MSGLDM_UI_SCREENSHOTS names a folder (ops/screenshots.py sets it)."""
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(300)  # let the last poll's repaint land
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"))
