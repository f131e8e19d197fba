"""API keys: ``Authorization: Bearer <key>``; only a SHA-256 of each key is stored (keys are 256-bit random)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import admission
from api.core.models import ApiKey, Role, utcnow
from api.core.settings import get_settings
from api.deps import SessionDep
from api.errors import ProblemError

KEY_PREFIX = "msk_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, name: str, role: Role, expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Create a key; the plain key is returned once and never stored."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, role=role, prefix=plain[:12], key_hash=hash_key(plain), expires_at=expires_at)
    session.add(row)
    session.commit()
    return row, plain


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="msgldm"'})


def current_key(request: Request, session: SessionDep) -> ApiKey:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send an API key as 'Authorization: Bearer <key>'")
    row = session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(token.strip()))).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        raise _unauthorized("the API key is not valid")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise _unauthorized("the API key has expired")
    request.state.key_id = row.id
    admission.hit(session, f"key:{row.id}", get_settings().api.rate_limit_per_minute)
    return row


KeyDep = Annotated[ApiKey, Depends(current_key)]


def require(*roles: Role):  # type: ignore[no-untyped-def]
    """A dependency that admits the given roles (admin always)."""

    def check(key: KeyDep) -> ApiKey:
        if key.role != Role.admin and key.role not in roles:
            raise ProblemError(403, "forbidden", f"the role {key.role!r} may not do this")
        return key

    return Depends(check)
