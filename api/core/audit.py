"""The audit log: who did what to which job, key or model. Append-only (database triggers refuse UPDATE and
DELETE); read by admins through ``GET /api/v1/admin/audit``.

Actions: ``job.submit``, ``job.view``, ``result.download``, ``job.cancel``, ``job.retry``, ``key.create``,
``key.revoke`` (the training and model endpoints add theirs). ``detail`` carries identifiers and counts only,
never patient data.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy.orm import Session

from api.core.models import ApiKey, AuditEvent

VIEW_EVERY_SECONDS = 300  # a key polling a job is one `job.view` per job and 5 minutes (per API process)
_views: OrderedDict[tuple[str, str], float] = OrderedDict()
_views_lock = threading.Lock()


def record(session: Session, key: ApiKey | None, action: str, target_type: str, target_id: str | None,
           detail: dict[str, Any] | None = None) -> AuditEvent:
    """Append one event and commit it (``key`` None: an operator at the CLI)."""
    event = AuditEvent(actor_key_id=key.id if key is not None else None,
                       actor_role=str(key.role) if key is not None else "operator",
                       action=action, target_type=target_type, target_id=target_id, detail=detail)
    session.add(event)
    session.commit()
    return event


def record_view(session: Session, key: ApiKey, job_id: str) -> None:
    """``job.view``, at most once per key, job and ``VIEW_EVERY_SECONDS``: status polling every second would
    otherwise write (and commit) an audit row per poll, the largest cost of a status request."""
    now = time.monotonic()
    with _views_lock:
        last = _views.get((key.id, job_id))
        if last is not None and now - last < VIEW_EVERY_SECONDS:
            return
        _views[(key.id, job_id)] = now
        _views.move_to_end((key.id, job_id))
        while len(_views) > 100_000:
            _views.popitem(last=False)
    record(session, key, "job.view", "job", job_id)
