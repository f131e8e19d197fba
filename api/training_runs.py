"""Queueing a training run (``POST /api/v1/admin/training-runs``): the preset's and base version's modalities,
the dataset checked against them, the row committed, then published (FastAPI-free, like ``api.submission``)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api import datasets
from api.core import audit
from api.core.errors import ProblemError
from api.core.models import ApiKey, ModelVersion, TrainingRun
from api.core.queue import publish_or_undo, publish_training
from api.core.storage import Storage
from api.schemas import TrainingRunCreate


def queue_run(session: Session, storage: Storage, *, key: ApiKey, request: TrainingRunCreate) -> TrainingRun:
    """422 ``unknown_preset`` / ``unknown_base_version`` / ``invalid_dataset`` (with the dataset report), else the
    queued run (blocking: the dataset check reads headers)."""
    modalities = datasets.preset_modalities(request.preset)
    if request.base_version is not None:
        base = session.get(ModelVersion, request.base_version)
        if base is None:
            raise ProblemError(422, "unknown_base_version", f"no model version {request.base_version}")
        modalities = base.modalities or modalities
    report = datasets.validate(request.dataset, storage, modalities)
    if not report.valid:
        raise ProblemError(422, "invalid_dataset", f"the dataset is not usable: {'; '.join(report.problems[:5])}",
                           report=report.model_dump())
    params = request.model_dump(exclude={"preset", "dataset"})
    run = TrainingRun(owner_id=key.id, preset=request.preset, dataset=request.dataset.model_dump(exclude_none=True),
                      params=params | {"cases": report.cases}, history=[], log_tail="")
    session.add(run)
    session.commit()
    publish_or_undo(session, run, publish_training)
    audit.record(session, key, "model.train", "training_run", run.id,
                 {"preset": run.preset, "stages": params.get("stages"), "base_version": params.get("base_version")})
    return run
