"""The audit log: who did what to which job, key or model. Append-only (database triggers refuse UPDATE and
DELETE); read by admins through ``GET /api/v1/admin/audit``.

Actions: ``job.submit``, ``job.view``, ``result.download``, ``job.cancel``, ``job.retry``, ``key.create``,
``key.revoke`` (the training and model endpoints add theirs). ``detail`` carries identifiers and counts only,
never patient data.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.core.models import ApiKey, AuditEvent


def record(session: Session, key: ApiKey | None, action: str, target_type: str, target_id: str | None,
           detail: dict[str, Any] | None = None) -> AuditEvent:
    """Append one event and commit it (``key`` None: an operator at the CLI)."""
    event = AuditEvent(actor_key_id=key.id if key is not None else None,
                       actor_role=str(key.role) if key is not None else "operator",
                       action=action, target_type=target_type, target_id=target_id, detail=detail)
    session.add(event)
    session.commit()
    return event
