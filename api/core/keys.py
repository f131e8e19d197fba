"""API keys: only a SHA-256 of each key is stored (keys are 256-bit random). Shared by the API's authentication
(``api/auth.py``), the CLI and the DICOM listener, which submits with a key of its own."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from api.core.models import ApiKey, Role, utcnow

KEY_PREFIX = "msk_"


class KeyRefused(Exception):
    """The key is unknown, revoked or expired; the message says which, without echoing the key."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, *, name: str, role: Role, expires_at: datetime | None = None) -> tuple[ApiKey, str]:
    """Create a key; the plain key is returned once and never stored."""
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, role=role, prefix=plain[:12], key_hash=hash_key(plain), expires_at=expires_at)
    session.add(row)
    session.commit()
    return row, plain


# Built once: on the status poll, building the statement cost more CPU than executing it (docs/benchmarks.md s.3).
_BY_HASH = select(ApiKey).where(ApiKey.key_hash == bindparam("key_hash"))


def active_key(session: Session, plain: str) -> ApiKey:
    """The key row of ``plain`` if it may be used now; KeyRefused otherwise."""
    row = session.execute(_BY_HASH, {"key_hash": hash_key(plain)}).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        raise KeyRefused("the API key is not valid")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise KeyRefused("the API key has expired")
    return row
