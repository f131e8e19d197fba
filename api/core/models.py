"""ORM: API keys, jobs, worker heartbeats, training runs, model versions, the audit log, rate-limit counters.
State lives here, never in Celery results."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from api.core.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Role(enum.StrEnum):
    integrator = "integrator"  # submits studies, reads its own jobs
    radiologist = "radiologist"  # reads every job and its results
    admin = "admin"  # everything: keys, models, training


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Leased:
    """The columns of the claim/lease/fencing state machine (``api/core/leases.py``), shared by jobs and training
    runs; ``status`` takes ``JobStatus`` values in both tables."""

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[str | None] = mapped_column(String(100))

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    fencing_token: Mapped[str | None] = mapped_column(String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Job(Leased, Base):
    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_job_owner_idempotency_key"),
        Index("ix_job_status_created_at", "status", "created_at"),
    )

    owner_id: Mapped[str] = mapped_column(ForeignKey("api_key.id"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))

    phase: Mapped[str] = mapped_column(String(32), default="queued")

    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)  # modality -> {key, sha256, bytes}
    # a pull job (docs/pacs.md): {"node", "study_uid", "series_uids", "fetched"}; inputs are filled by the worker
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    targets: Mapped[list[str]] = mapped_column(JSON)
    formats: Mapped[list[str]] = mapped_column(JSON)
    steps: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer, default=1)
    preprocess: Mapped[str] = mapped_column(String(8), default="auto", server_default="auto")  # auto|none|full
    output_grid: Mapped[str] = mapped_column(String(16), default="reference",
                                             server_default="reference")  # reference | a modality | atlas
    results: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)  # result name -> object key


class DeliveryStatus(enum.StrEnum):
    pending = "pending"  # waiting for the job, for its next attempt, or being sent
    delivered = "delivered"  # sent and verified: the node lists every SOP instance
    failed = "failed"  # the node refused it, or every attempt failed


class Delivery(Base):
    """A job's DICOM result to be sent to one configured node (``deliver_to``); retried apart from the job."""

    __tablename__ = "delivery"
    __table_args__ = (UniqueConstraint("job_id", "node", name="uq_delivery_job_node"),
                      Index("ix_delivery_status_next_attempt_at", "status", "next_attempt_at"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    node: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[int | None] = mapped_column(Integer)  # SOP instances sent (and found) on the last attempt
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: not before the job succeeds
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # an attempt in progress
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class WorkerHeartbeat(Base):
    __tablename__ = "worker_heartbeat"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[str] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(50))
    model_version: Mapped[str | None] = mapped_column(String(100))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelStatus(enum.StrEnum):
    candidate = "candidate"  # registered by a training run, never served
    serving = "serving"  # the one version every worker serves (at most one row)
    retired = "retired"  # served before; rollback or promotion may bring it back


class ModelVersion(Base):
    """A model checkpoint known to the service, by content hash (``model.checkpoint.checkpoint_version``)."""

    __tablename__ = "model_version"
    __table_args__ = (  # at most one serving version, enforced by the database
        Index("uq_model_version_serving", "status", unique=True, postgresql_where=text("status = 'serving'"),
              sqlite_where=text("status = 'serving'")),
    )

    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.candidate)
    preset: Mapped[str | None] = mapped_column(String(100))
    modalities: Mapped[list[str]] = mapped_column(JSON, default=list)
    storage_prefix: Mapped[str | None] = mapped_column(String(300))  # models/<version>/ in object storage
    local_path: Mapped[str | None] = mapped_column(Text)  # or a folder on every worker (the shipped default)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    training_run_id: Mapped[str | None] = mapped_column(ForeignKey("training_run.id"))
    base_version: Mapped[str | None] = mapped_column(String(100))
    previous_version: Mapped[str | None] = mapped_column(String(100))  # what served before its promotion
    promoted_forced: Mapped[bool] = mapped_column(default=False)
    promotion_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TrainingRun(Leased, Base):
    """An admin's training run: the same claim/lease/fencing columns as a job, with a lease suited to hours."""

    __tablename__ = "training_run"
    __table_args__ = (Index("ix_training_run_status_created_at", "status", "created_at"),)

    owner_id: Mapped[str] = mapped_column(ForeignKey("api_key.id"), index=True)
    stage: Mapped[str | None] = mapped_column(String(16))  # "0", "1", "2", "evaluate"

    preset: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"path"|"prefix", "layout"}
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # stages, epochs, max_steps, batch_size, gpus, base_version
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    gates: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=dict)  # the trainer's, by stage (model.gates)
    log_tail: Mapped[str] = mapped_column(Text, default="")
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # last uploaded: {"stage", "step"}
class AuditEvent(Base):
    """One audited action; append-only (the migration installs triggers that refuse UPDATE and DELETE).

    ``detail`` holds identifiers and counts only, never patient data (names, IDs, file names)."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_target", "target_type", "target_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor_key_id: Mapped[str | None] = mapped_column(String(36), index=True)  # None: an operator at the CLI
    actor_role: Mapped[str] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(32), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RateCounter(Base):
    """Requests per bucket (a key and what it does) and fixed window; used when the broker is not Redis."""

    __tablename__ = "rate_counter"

    bucket: Mapped[str] = mapped_column(String(100), primary_key=True)
    window: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # unix time // window length
    count: Mapped[int] = mapped_column(Integer, default=0)
