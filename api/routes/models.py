"""Model versions: what serves now, candidates from training runs with their metrics, retired ones."""

from __future__ import annotations

from fastapi import APIRouter

from api.auth import KeyDep
from api.core import registry
from api.core.models import ModelVersion
from api.deps import SessionDep
from api.schemas import PROBLEM_RESPONSES, ModelList, ModelVersionPublic

router = APIRouter(prefix="/api/v1/models", tags=["models"])


def to_public(row: ModelVersion) -> ModelVersionPublic:
    return ModelVersionPublic(version=row.version, status=row.status, preset=row.preset, created_at=row.created_at,
                              promoted_at=row.promoted_at, training_run_id=row.training_run_id,
                              base_version=row.base_version, previous_version=row.previous_version,
                              forced=row.promoted_forced, metrics=row.metrics or {})


@router.get("", response_model=ModelList, responses=PROBLEM_RESPONSES)
def list_models(session: SessionDep, key: KeyDep) -> ModelList:
    """Every registered version, newest first, and the one serving (any role)."""
    serving = registry.serving(session)
    return ModelList(serving=serving.version if serving else None,
                     items=[to_public(r) for r in registry.listing(session)])
