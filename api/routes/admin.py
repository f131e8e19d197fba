"""Admin: training runs (queue, follow, cancel, list), dataset validation, model promotion and rollback."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import datasets, training_runs
from api.auth import require
from api.core import audit, registry
from api.core import training as runs
from api.core.models import ApiKey, JobStatus, TrainingRun
from api.deps import SessionDep, StorageDep
from api.pagination import newest_first
from api.routes.models import to_public as version_public
from api.schemas import (
    PROBLEM_RESPONSES,
    DatasetReport,
    DatasetSpec,
    GateResult,
    HistoryEntry,
    ModelVersionPublic,
    Problem,
    PromoteRequest,
    TrainingRunCreate,
    TrainingRunList,
    TrainingRunPublic,
)

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])
ADMIN = require()  # admin only
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "no such run or version"}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": Problem, "description": "not allowed now; see `code`"}}


def run_public(run: TrainingRun) -> TrainingRunPublic:
    stage: int | str | None = int(run.stage) if run.stage and run.stage.isdigit() else run.stage
    return TrainingRunPublic(
        id=run.id, status=run.status, stage=stage, progress=run.progress, preset=run.preset, dataset=run.dataset,
        params=run.params, created_at=run.created_at, started_at=run.started_at, finished_at=run.finished_at,
        history=[HistoryEntry(**h) for h in run.history or []],
        gates={k: GateResult(**g) for k, g in (run.gates or {}).items()}, log_tail=run.log_tail or "",
        checkpoint=run.checkpoint, model_version=run.model_version, error_code=run.error_code,
        error_message=run.error_message, attempts=run.attempts)


def _get_run(session: Session, run_id: str) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise runs.RunNotFound(f"no training run {run_id}")
    return run


@router.post("/datasets/validate", response_model=DatasetReport, responses=PROBLEM_RESPONSES)
async def validate_dataset(spec: DatasetSpec, storage: StorageDep, preset: str | None = None,
                           key: ApiKey = ADMIN) -> DatasetReport:
    """Check a dataset before training on it: cases, modalities per case, label convention, geometry problems.
    With ``?preset=``, also that every case has the modalities that preset's model needs."""
    modalities = datasets.preset_modalities(preset) if preset else None
    return await run_in_threadpool(datasets.validate, spec, storage, modalities)


@router.post("/training-runs", status_code=202, response_model=TrainingRunPublic, responses={
    **PROBLEM_RESPONSES, 422: {"model": Problem, "description": "invalid request, unknown preset or base version, "
                                                                "or an invalid dataset (`report` has the findings)"}})
async def create_run(body: TrainingRunCreate, response: Response, session: SessionDep, storage: StorageDep,
                     key: ApiKey = ADMIN) -> TrainingRunPublic:
    """Queue a training run on the training queue; refused with the dataset report when the dataset is invalid."""
    run = await run_in_threadpool(lambda: training_runs.queue_run(session, storage, key=key, request=body))
    response.headers["Location"] = f"/api/v1/admin/training-runs/{run.id}"
    return run_public(run)


@router.get("/training-runs", response_model=TrainingRunList, responses=PROBLEM_RESPONSES)
def list_runs(session: SessionDep, key: ApiKey = ADMIN,
              status: Annotated[JobStatus | None, Query(description="only runs in this state")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None
              ) -> TrainingRunList:
    """Training runs, newest first."""
    query = select(TrainingRun)
    if status is not None:
        query = query.where(TrainingRun.status == status)
    page, next_cursor = newest_first(session, query, TrainingRun, limit=limit, cursor=cursor)
    return TrainingRunList(items=[run_public(r) for r in page], next_cursor=next_cursor)


@router.get("/training-runs/{run_id}", response_model=TrainingRunPublic, responses={**PROBLEM_RESPONSES, **NOT_FOUND})
def get_run(run_id: str, session: SessionDep, key: ApiKey = ADMIN) -> TrainingRunPublic:
    """A run's state, stage, progress, losses and validation metrics per logged step, log tail, model version."""
    return run_public(_get_run(session, run_id))


@router.post("/training-runs/{run_id}/cancel", response_model=TrainingRunPublic,
             responses={**PROBLEM_RESPONSES, **NOT_FOUND, **CONFLICT})
def cancel_run(run_id: str, session: SessionDep, key: ApiKey = ADMIN) -> TrainingRunPublic:
    """Cancel: a queued run at once; a running one's trainer process group is killed within seconds."""
    run = runs.request_cancel(session, _get_run(session, run_id))
    audit.record(session, key, "training_run.cancel", "training_run", run.id, {"status": run.status})
    return run_public(run)


@router.post("/models/{version}/promote", response_model=ModelVersionPublic,
             responses={**PROBLEM_RESPONSES, **NOT_FOUND, **CONFLICT})
def promote(version: str, session: SessionDep, body: PromoteRequest | None = None,
            key: ApiKey = ADMIN) -> ModelVersionPublic:
    """Serve this version from every worker's next job; the serving one is retired. A version that does not beat
    both baselines on its validation split needs ``force: true`` (409 ``below_baselines`` otherwise)."""
    body = body or PromoteRequest(force=False, reason=None)
    row = registry.promote(session, version, force=body.force, reason=body.reason)
    audit.record(session, key, "model.promote", "model", row.version,
                 {"forced": bool(row.promoted_forced), "previous_version": row.previous_version,
                  "reason": body.reason})
    return version_public(row)


@router.post("/models/{version}/rollback", response_model=ModelVersionPublic,
             responses={**PROBLEM_RESPONSES, **NOT_FOUND, **CONFLICT})
def rollback(version: str, session: SessionDep, key: ApiKey = ADMIN) -> ModelVersionPublic:
    """Retire the serving ``version`` and serve the one it replaced again (returned)."""
    row = registry.rollback(session, version)
    audit.record(session, key, "model.rollback", "model", version, {"now_serving": row.version})
    return version_public(row)
