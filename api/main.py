"""The FastAPI application: routers, problem+json errors, metrics, upload size limit."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from api import errors
from api.core.settings import get_settings
from api.limits import BodySizeLimit
from api.metrics import MetricsMiddleware
from api.routes import health, jobs, synthesize

UI_DIR = Path(__file__).parent / "ui"  # the web UI: static files, no build step (docs/ui.md)

DESCRIPTION = """
Fills in a missing brain MRI sequence (T1, T2, T1CE or FLAIR) with MSG-LDM, a multiscale structure-guided
latent diffusion model. Send the acquired sequences as NIfTI, poll the job, download the synthesized volume.

**Auth**: `Authorization: Bearer <api key>`. Roles: `integrator` (submit, read its own jobs), `radiologist`
(read every job and result), `admin` (everything).

**Errors** are RFC 9457 `application/problem+json` with a stable `code` (see docs/errors.md).

Synthesized images are not for primary diagnosis.
"""


def create_app() -> FastAPI:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(title="MSG-LDM synthesis service", version="0.1.0", description=DESCRIPTION,
                  openapi_tags=[{"name": "synthesis", "description": "submit a study"},
                                {"name": "jobs", "description": "follow jobs and fetch results"},
                                {"name": "health", "description": "probes and metrics"}])
    errors.install(app)
    app.include_router(synthesize.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api.max_upload_bytes)
    app.add_middleware(MetricsMiddleware)
    return app


app = create_app()
