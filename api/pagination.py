"""Keyset pagination, newest first, over the leased tables (jobs, training runs: ``created_at`` then ``id``): one
cursor format, opaque to clients (``next_cursor`` of the previous page)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from api.core.errors import ProblemError
from api.core.models import Leased

Row = TypeVar("Row", bound=Leased)


def encode_cursor(row: Leased) -> str:
    return base64.urlsafe_b64encode(json.dumps([row.created_at.isoformat(), row.id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """422 ``invalid_cursor`` for anything this API did not return."""
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(row_id)
    except (ValueError, TypeError) as exc:
        raise ProblemError(422, "invalid_cursor", "the cursor is not one this API returned") from exc


def newest_first(session: Session, query: Select[Any], table: type[Row], *, limit: int, cursor: str | None
                 ) -> tuple[Sequence[Row], str | None]:
    """One page of ``query`` (a select of ``table``, filters applied), newest first, and the next page's cursor
    (None on the last page)."""
    query = query.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)
    if cursor:
        created, row_id = decode_cursor(cursor)
        query = query.where(or_(table.created_at < created, and_(table.created_at == created, table.id < row_id)))
    rows = session.execute(query).scalars().all()
    page = rows[:limit]
    return page, encode_cursor(page[-1]) if len(rows) > limit else None
