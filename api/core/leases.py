"""The one claim/lease/fencing state machine, used by jobs (``api/core/jobs.py``) and training runs
(``api/core/training.py``); every transition is one conditional UPDATE.

queued -> running (claim: attempt + 1, new fencing token, lease) -> succeeded | failed | cancelled;
running with an expired lease -> queued again (re-published by the reaper) or failed after the attempt limit
(``worker_lost``). A worker whose fencing token no longer matches (its lease expired and the row moved on)
changes nothing. Rows carry the columns of ``api.core.models.Leased``; a table with a ``phase`` column (jobs) gets
it set with every state change.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.core.models import JobStatus, Leased, utcnow

ACTIVE = (JobStatus.queued, JobStatus.running)
Row = TypeVar("Row", bound=Leased)


class InvalidTransition(RuntimeError):
    """The row is not in a state that allows this operation."""


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it works on a row: its id, the attempt number and the fencing token."""

    id: str
    attempt: int
    token: str


class Leases(Generic[Row]):
    """The state machine over one table of ``Leased`` rows (``noun`` names a row in messages)."""

    def __init__(self, table: type[Row], noun: str, worker: str = "worker") -> None:
        self.table, self.noun, self.worker = table, noun, worker
        self.phases = "phase" in table.__table__.columns  # type: ignore[attr-defined]

    def _phase(self, phase: str) -> dict[str, Any]:
        return {"phase": phase} if self.phases else {}

    def _fenced(self, c: Claim):  # type: ignore[no-untyped-def]
        t = self.table
        return update(t).where(t.id == c.id, t.fencing_token == c.token, t.status == JobStatus.running)

    @staticmethod
    def _apply(session: Session, stmt: Any) -> bool:
        result = session.execute(stmt.execution_options(synchronize_session=False))
        session.commit()
        return result.rowcount == 1  # type: ignore[attr-defined,no-any-return]

    def claim(self, session: Session, row_id: str, *, worker_id: str, lease_seconds: int, max_attempts: int
              ) -> Claim | None:
        """Atomically take a queued row; None when another delivery already holds it or it is finished."""
        t, token, now = self.table, str(uuid.uuid4()), utcnow()
        values = {"status": JobStatus.running, "attempts": t.attempts + 1, "fencing_token": token,
                  "worker_id": worker_id, "lease_expires_at": now + timedelta(seconds=lease_seconds),
                  "started_at": func.coalesce(t.started_at, now), "updated_at": now, **self._phase("starting")}
        if self.phases:
            values["progress"] = 0
        stmt = update(t).where(t.id == row_id, t.status == JobStatus.queued, t.cancel_requested.is_(False),
                               t.attempts < max_attempts).values(**values)
        if not self._apply(session, stmt):
            return None
        attempt = session.execute(select(t.attempts).where(t.id == row_id)).scalar_one()
        return Claim(id=row_id, attempt=attempt, token=token)

    def renew(self, session: Session, c: Claim, *, lease_seconds: int, **values: Any) -> bool:
        """Extend the lease and write ``values`` (progress, phase, ...); False when the claim is stale or cancel
        was requested (which is how a worker learns of it)."""
        values |= {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds), "updated_at": utcnow()}
        if "progress" in values:
            values["progress"] = max(0, min(100, int(values["progress"])))
        if not self._apply(session, self._fenced(c).values(**values)):
            return False
        t = self.table
        return not session.execute(select(t.cancel_requested).where(t.id == c.id)).scalar_one()

    def complete(self, session: Session, c: Claim, **values: Any) -> bool:
        """Mark succeeded with ``values`` (results, model_version...); False (nothing changed) when stale."""
        now = utcnow()
        return self._apply(session, self._fenced(c).values(
            status=JobStatus.succeeded, progress=100, finished_at=now, updated_at=now, lease_expires_at=None,
            **self._phase("done"), **values))

    def fail(self, session: Session, c: Claim, *, code: str, message: str, retry: bool = False, **values: Any
             ) -> bool:
        """End the attempt: failed with a code, or back to queued when ``retry`` (the caller checks attempts)."""
        now = utcnow()
        values |= {"updated_at": now, "lease_expires_at": None, "fencing_token": None,  # nosec B105 - not a password
                   "error_code": code, "error_message": message}
        if retry:
            values |= {"status": JobStatus.queued, **self._phase("queued")}
        else:
            values |= {"status": JobStatus.failed, "finished_at": now, **self._phase("failed")}
        return self._apply(session, self._fenced(c).values(**values))

    def mark_cancelled(self, session: Session, c: Claim, **values: Any) -> bool:
        now = utcnow()
        return self._apply(session, self._fenced(c).values(
            status=JobStatus.cancelled, finished_at=now, updated_at=now, lease_expires_at=None, fencing_token=None,
            **self._phase("cancelled"), **values))

    def request_cancel(self, session: Session, row: Row) -> Row:
        """Cancel a queued row at once; ask a running one to stop (its worker sees it at the next renewal)."""
        if JobStatus(row.status).finished:
            raise InvalidTransition(f"{self.noun} {row.id} is already {row.status}")
        t, now = self.table, utcnow()
        session.execute(update(t).where(t.id == row.id, t.status.in_(ACTIVE))
                        .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))
        session.execute(update(t).where(t.id == row.id, t.status == JobStatus.queued)
                        .values(status=JobStatus.cancelled, finished_at=now, **self._phase("cancelled"))
                        .execution_options(synchronize_session=False))
        session.commit()
        session.refresh(row)
        return row

    def reap_expired(self, session: Session, *, max_attempts: int, now: datetime | None = None
                     ) -> tuple[list[str], list[str]]:
        """Running rows whose lease expired: re-queue (returned for re-publishing) or fail at the attempt limit."""
        t, now = self.table, now or utcnow()
        expired = session.execute(select(t.id, t.attempts, t.fencing_token, t.cancel_requested)
                                  .where(t.status == JobStatus.running, t.lease_expires_at < now)).all()
        requeued: list[str] = []
        failed: list[str] = []
        for row_id, attempts, token, cancel in expired:
            guard = update(t).where(t.id == row_id, t.fencing_token == token, t.status == JobStatus.running)
            if cancel:
                values: dict[str, Any] = {"status": JobStatus.cancelled, "finished_at": now,
                                          **self._phase("cancelled")}
            elif attempts >= max_attempts:
                values = {"status": JobStatus.failed, "finished_at": now, "error_code": "worker_lost",
                          "error_message": f"the {self.worker} stopped answering on each of {attempts} attempts",
                          **self._phase("failed")}
            else:
                values = {"status": JobStatus.queued, **self._phase("queued")}
            values |= {"fencing_token": None, "lease_expires_at": None, "updated_at": now}  # nosec B105
            if session.execute(guard.values(**values).execution_options(synchronize_session=False)).rowcount == 1:  # type: ignore[attr-defined]
                (requeued if values["status"] == JobStatus.queued else failed).append(row_id)
        session.commit()
        return requeued, failed

    def stale_queued(self, session: Session, *, older_than: timedelta, now: datetime | None = None) -> list[str]:
        """Queued rows untouched for ``older_than``: their message may be lost (broker restart); re-publish them."""
        t = self.table
        cutoff = (now or utcnow()) - older_than
        ids = list(session.execute(select(t.id).where(t.status == JobStatus.queued, t.updated_at < cutoff)).scalars())
        if ids:
            session.execute(update(t).where(t.id.in_(ids), t.status == JobStatus.queued)
                            .values(updated_at=utcnow()).execution_options(synchronize_session=False))
            session.commit()
        return ids
