"""Errors of the shared kernel that the API answers with a stable code (``api/errors.py`` maps them)."""

from __future__ import annotations


class NotFound(LookupError):
    """A row that does not exist (or that the caller may not see): answered 404 with ``code``."""

    code = "not_found"
