"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select, text

from api.core.models import WorkerHeartbeat, utcnow
from api.core.queue import get_celery
from api.core.settings import get_settings
from api.deps import SessionDep, StorageDep
from api.metrics import REGISTRY, refresh_job_gauges

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is not ready; `checks` says which"}})
def readyz(session: SessionDep, storage: StorageDep) -> JSONResponse:
    """Database, broker, storage, a live worker and a loaded model."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"down: {type(exc).__name__}"
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"down: {type(exc).__name__}"
    try:
        storage.ping()
        checks["storage"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["storage"] = f"down: {type(exc).__name__}"
    if checks["database"] == "ok":
        fresh = utcnow() - timedelta(seconds=get_settings().api.worker_heartbeat_seconds)
        workers = session.execute(select(WorkerHeartbeat).where(WorkerHeartbeat.seen_at >= fresh)).scalars().all()
        checks["worker"] = "ok" if workers else "no worker heartbeat"
        loaded = [w.model_version for w in workers if w.model_version]
        checks["model"] = f"ok: {loaded[0]}" if loaded else "no worker has loaded the model"
    ready = all(v.startswith("ok") for v in checks.values()) and len(checks) == 5
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503,
                        headers={} if ready else {"Retry-After": "5"})


@router.get("/metrics", response_class=Response)
def metrics(session: SessionDep) -> Response:
    """Prometheus metrics: request rates and latencies, jobs by state, queue depth."""
    refresh_job_gauges(session)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
