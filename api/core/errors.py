"""Errors answered with a stable code (docs/errors.md): raised by the API's checks and the kernel, also where no
FastAPI runs (the DICOM listener, a pull in the worker); ``api/errors.py`` maps them to problem+json."""

from __future__ import annotations

from typing import Any


class NotFound(LookupError):
    """A row that does not exist (or that the caller may not see): answered 404 with ``code``."""

    code = "not_found"


class ProblemError(Exception):
    """An error the API answers with; ``code`` is stable and documented in docs/errors.md."""

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.title = title or code.replace("_", " ").capitalize()
        self.headers = headers or {}
        self.extra = extra


def unavailable(code: str, detail: str) -> ProblemError:
    return ProblemError(503, code, detail, title="Service unavailable", headers={"Retry-After": "5"})
