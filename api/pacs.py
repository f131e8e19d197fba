"""The PACS options of a submission (docs/pacs.md): ``deliver_to`` (push the DICOM result back) and the pull fields
``source_node`` + ``study_uid`` (+ ``series_uids``), which the worker retrieves instead of uploaded files."""

from __future__ import annotations

import re
from typing import Any

from api.core.deliveries import node_names, require_nodes
from api.core.errors import ProblemError
from api.core.settings import DicomSettings

PULL_FIELDS = ("source_node", "study_uid", "series_uids")
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # DICOM UI: digits and dots, at most 64 characters


def deliver_to(fields: dict[str, str], cfg: DicomSettings) -> list[str]:
    names = node_names(fields.get("deliver_to"))
    require_nodes(names, cfg, "deliver_to")
    return names


def _uid(value: str, field: str) -> str:
    if not (UID.match(value) and len(value) <= 64):
        raise ProblemError(422, "invalid_uid", f"{field}: {value[:80]!r} is not a DICOM UID (digits and dots, at "
                                               "most 64 characters)", field=field)
    return value


def pull_source(fields: dict[str, str], has_files: bool, cfg: DicomSettings) -> dict[str, Any] | None:
    """The study to retrieve, or None for an upload; 422 for a half-given or contradictory pull."""
    if not any(fields.get(f) for f in PULL_FIELDS):
        return None
    if has_files:
        raise ProblemError(422, "pull_with_files", "send either files or source_node + study_uid, not both")
    node_name, study_uid = fields.get("source_node", "").strip(), fields.get("study_uid", "").strip()
    if not node_name or not study_uid:
        raise ProblemError(422, "invalid_pull", "a pull needs both source_node and study_uid",
                           field="source_node" if not node_name else "study_uid")
    require_nodes([node_name], cfg, "source_node")
    series = [_uid(s.strip(), "series_uids") for s in fields.get("series_uids", "").split(",") if s.strip()]
    return {"node": node_name, "study_uid": _uid(study_uid, "study_uid"), "series_uids": series}
