"""The FastAPI application: routers, problem+json errors, metrics, upload size limit."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from api import errors
from api.body_limit import BodySizeLimit
from api.core.settings import get_settings
from api.metrics import MetricsMiddleware
from api.routes import admin, audit, deliveries, health, jobs, models, synthesize
from api.schemas import Problem

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
                                {"name": "models", "description": "model versions and the serving one"},
                                {"name": "admin",
                                 "description": "training runs, datasets, promotion, rollback, the audit log"},
                                {"name": "health", "description": "probes and metrics"}])
    errors.install(app)
    app.include_router(synthesize.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(admin.router)
    app.include_router(deliveries.router)
    app.include_router(health.router)
    app.include_router(audit.router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api.max_upload_bytes)
    app.add_middleware(MetricsMiddleware)
    app.openapi = lambda: _problem_openapi(app)  # type: ignore[method-assign]
    return app


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema, with every error response documented as it is sent: application/problem+json
    with the Problem schema (FastAPI would document application/json and, for 422, its own validation body)."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                           tags=app.openapi_tags)
        spec.setdefault("components", {}).setdefault("schemas", {})["Problem"] = Problem.model_json_schema(
            ref_template="#/components/schemas/{model}")
        problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in spec["paths"].values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                    if status[:1] in "45" and schema.get("$ref", "").endswith(("/Problem", "/HTTPValidationError")):
                        response["content"] = problem
        for unused in ("HTTPValidationError", "ValidationError"):
            spec["components"]["schemas"].pop(unused, None)
        app.openapi_schema = spec
    return app.openapi_schema


app = create_app()
# What start-up loaded lives as long as the process: out of the cyclic garbage collector's way. Otherwise each full
# collection walked it and paused every request in flight (status p99 120 -> 55 ms; docs/benchmarks.md section 3).
gc.collect()
gc.freeze()
