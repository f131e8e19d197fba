"""The model registry: versions by content hash, the one serving version, promotion and rollback.

A training run registers a *candidate*; nothing serves it until an admin promotes it. Promotion makes it the one
``serving`` row (a partial unique index allows no second) and retires the one it replaces, remembering it as
``previous_version``; rollback of the serving version brings that one back. Workers resolve the serving version
per job (:func:`serving`), so a promotion takes effect from each worker's next job without a restart. While no
version is registered at all, workers serve ``settings.inference.checkpoint`` and register it as the initial
serving version (:func:`register_initial`), so a fresh installation behaves as before the registry existed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.core.errors import NotFound
from api.core.models import ModelStatus, ModelVersion, utcnow


class VersionNotFound(NotFound):
    """No model version with this name."""

    code = "model_version_not_found"


class PromotionRefused(RuntimeError):
    """The promotion or rollback is not allowed; ``code`` says why (docs/errors.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def get(session: Session, version: str) -> ModelVersion:
    row = session.get(ModelVersion, version)
    if row is None:
        raise VersionNotFound(f"no model version {version}")
    return row


def serving(session: Session) -> ModelVersion | None:
    """The version workers serve now; None before any version is registered."""
    return session.execute(select(ModelVersion).where(ModelVersion.status == ModelStatus.serving)).scalar_one_or_none()


def listing(session: Session) -> list[ModelVersion]:
    return list(session.execute(select(ModelVersion).order_by(ModelVersion.created_at.desc())).scalars())


def register_initial(session: Session, *, version: str, local_path: str, preset: str | None,
                     modalities: list[str], metrics: dict[str, Any]) -> ModelVersion | None:
    """Register the configured checkpoint as serving when the registry is empty; None when it is not (or when
    another worker registered first)."""
    if session.execute(select(func.count()).select_from(ModelVersion)).scalar_one():
        return None
    row = ModelVersion(version=version, status=ModelStatus.serving, preset=preset, modalities=modalities,
                       local_path=local_path, metrics=metrics, promoted_at=utcnow())
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # another worker registered it (or another serving version) at the same time
        session.rollback()
        return None
    return row


def register_candidate(session: Session, *, version: str, storage_prefix: str, preset: str, modalities: list[str],
                       metrics: dict[str, Any], training_run_id: str, base_version: str | None) -> ModelVersion:
    """Register a trained checkpoint as a candidate; an existing version (same content) is returned unchanged."""
    row = session.get(ModelVersion, version)
    if row is not None:
        return row
    row = ModelVersion(version=version, status=ModelStatus.candidate, preset=preset, modalities=modalities,
                       storage_prefix=storage_prefix, metrics=metrics, training_run_id=training_run_id,
                       base_version=base_version)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # the same content registered concurrently (a stale attempt): that row stands
        session.rollback()
        return get(session, version)
    return row


def beats_baselines(row: ModelVersion) -> bool:
    return bool((row.metrics or {}).get("beats_baselines"))


def promote(session: Session, version: str, *, force: bool = False, reason: str | None = None) -> ModelVersion:
    """Make ``version`` the serving one; the version serving now is retired and remembered for rollback."""
    row = get(session, version)
    if row.status == ModelStatus.serving:
        raise PromotionRefused("already_serving", f"{version} is already serving")
    if not beats_baselines(row) and not force:
        raise PromotionRefused("below_baselines", f"{version} does not beat the baselines on its validation split "
                                                  "(or was never evaluated); promote with force=true to serve it")
    current = serving(session)
    now, forced = utcnow(), force and not beats_baselines(row)
    if current is not None:
        session.execute(update(ModelVersion).where(ModelVersion.version == current.version)
                        .values(status=ModelStatus.retired).execution_options(synchronize_session=False))
    session.execute(update(ModelVersion).where(ModelVersion.version == version)
                    .values(status=ModelStatus.serving, promoted_at=now, promoted_forced=forced,
                            promotion_reason=reason, previous_version=current.version if current else None)
                    .execution_options(synchronize_session=False))
    session.commit()  # one transaction: a concurrent promotion fails on the unique serving index
    session.refresh(row)
    return row


def rollback(session: Session, version: str) -> ModelVersion:
    """Retire the serving ``version`` and serve again the one it replaced; returns that one."""
    row = get(session, version)
    if row.status != ModelStatus.serving:
        raise PromotionRefused("nothing_to_roll_back", f"{version} is not the serving version ({row.status})")
    if not row.previous_version or session.get(ModelVersion, row.previous_version) is None:
        raise PromotionRefused("nothing_to_roll_back", f"{version} replaced no earlier version")
    previous = get(session, row.previous_version)
    session.execute(update(ModelVersion).where(ModelVersion.version == version)
                    .values(status=ModelStatus.retired).execution_options(synchronize_session=False))
    session.execute(update(ModelVersion).where(ModelVersion.version == previous.version)
                    .values(status=ModelStatus.serving, promoted_at=utcnow())
                    .execution_options(synchronize_session=False))
    session.commit()
    session.refresh(previous)
    return previous
