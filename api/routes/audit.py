"""GET /api/v1/admin/audit: the append-only audit log, newest first (admins only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.auth import require
from api.core.errors import ProblemError
from api.core.models import ApiKey, AuditEvent
from api.deps import SessionDep
from api.schemas import PROBLEM_RESPONSES, AuditEventPublic, AuditList

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])


@router.get("/audit", response_model=AuditList, responses=PROBLEM_RESPONSES)
def list_audit(session: SessionDep, key: ApiKey = require(),
               action: Annotated[str | None, Query(max_length=32, description="e.g. job.submit")] = None,
               actor_key_id: Annotated[str | None, Query(max_length=36)] = None,
               target_type: Annotated[str | None, Query(max_length=32)] = None,
               target_id: Annotated[str | None, Query(max_length=64)] = None,
               since: Annotated[datetime | None, Query(description="at or after (ISO 8601)")] = None,
               until: Annotated[datetime | None, Query(description="before (ISO 8601)")] = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 100,
               cursor: Annotated[str | None, Query(max_length=20, description="next_cursor of the previous page")]
               = None) -> AuditList:
    """Audit events, newest first, filtered by action, actor, target and time."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
    for column, value in ((AuditEvent.action, action), (AuditEvent.actor_key_id, actor_key_id),
                          (AuditEvent.target_type, target_type), (AuditEvent.target_id, target_id)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEvent.at >= _aware(since))
    if until is not None:
        query = query.where(AuditEvent.at < _aware(until))
    if cursor:
        if not cursor.isdigit():
            raise ProblemError(422, "invalid_cursor", "the cursor is not one this API returned")
        query = query.where(AuditEvent.id < int(cursor))
    rows = session.execute(query).scalars().all()
    page = rows[:limit]
    return AuditList(items=[AuditEventPublic.model_validate(r, from_attributes=True) for r in page],
                     next_cursor=str(page[-1].id) if len(rows) > limit else None)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
