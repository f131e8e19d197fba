"""Authentication: ``Authorization: Bearer <key>`` (keys: ``api/core/keys.py``) and the role dependencies."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api import admission
from api.core.errors import ProblemError
from api.core.keys import KeyRefused, active_key
from api.core.models import ApiKey, Role
from api.core.settings import get_settings
from api.deps import SessionDep


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="msgldm"'})


def current_key(request: Request, session: SessionDep) -> ApiKey:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send an API key as 'Authorization: Bearer <key>'")
    try:
        row = active_key(session, token.strip())
    except KeyRefused as exc:
        raise _unauthorized(str(exc)) from None
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
