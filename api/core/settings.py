"""One typed Settings object for the API, the worker and the CLIs (env prefix MSGLDM_, nesting with __).

The defaults are the embedded stack: SQLite under var/, objects under var/objects/, a Celery transport on a
SQLite file. Production (docker-compose.yml) sets PostgreSQL, Redis and MinIO through the same fields.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[2]
# Where the embedded stack keeps its files; a path outside the settings so that every default below follows it.
VAR = Path(os.environ.get("MSGLDM_VAR_DIR", ROOT / "var")).resolve()


class DatabaseSettings(BaseModel):
    url: str = f"sqlite:///{VAR / 'msgldm.db'}"
    echo: bool = False


class BrokerSettings(BaseModel):
    url: str = f"sqla+sqlite:///{VAR / 'broker.db'}"
    # Redis redelivers an unacked message after this many seconds: it must exceed the longest job
    # (reliability.md 1.4: at least 2 x task time limit + margin, as one prefetched task may wait a full run).
    visibility_timeout: int = 7200
    inference_queue: str = "inference"
    training_queue: str = "training"


class StorageSettings(BaseModel):
    backend: Literal["local", "s3"] = "local"
    local_root: Path = VAR / "objects"
    endpoint: str = "minio:9000"  # host:port, as the minio client wants it
    access_key: str = "minioadmin"
    secret_key: str = "minioadmin"
    bucket: str = "msgldm"
    secure: bool = False
    region: str | None = None


class InferenceSettings(BaseModel):
    checkpoint: Path = ROOT / "model" / "default"
    device: str | None = None  # None: cuda when present, else cpu
    # auto: bf16 autocast on CUDA; on a bf16-capable CPU bf16 for the encoders/decoder, fp32 UNet (docs/benchmarks.md)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    default_steps: int | None = None  # None: the checkpoint's own default
    cache_dir: Path = VAR / "model-cache"  # model versions fetched from object storage, one folder each
    max_loaded_models: int = 2  # synthesizers kept in memory per worker process (LRU)
    max_steps: int = 1000
    max_samples: int = 8


class JobSettings(BaseModel):
    lease_seconds: int = 60  # a running job's lease; the worker renews it every lease/4 seconds
    max_attempts: int = 3
    reaper_interval_seconds: float = 5.0
    soft_time_limit_seconds: int = 1800
    time_limit_seconds: int = 1900


class TrainingSettings(BaseModel):
    lease_seconds: int = 600  # a training run's lease; renewed every lease/4 seconds while the trainer lives
    max_attempts: int = 3
    time_limit_seconds: int = 7 * 24 * 3600  # Celery hard limit of one training task
    work_dir: Path = VAR / "training"  # per-run folders on the worker host (checkpoints also go to storage)
    checkpoint_upload_seconds: float = 60.0  # upload changed stage checkpoints at most this often (and at the end)
    log_tail_lines: int = 40
    threads: int | None = None  # torch CPU threads of the trainer (None: torch's default)
    validate_timeout_seconds: float = 300.0  # dataset validation in the API (reads headers and labels)
    # evaluation of a finished run against the baselines (model.evaluate); None: its defaults
    eval_steps: int | None = None
    eval_max_slices: int | None = None
    eval_targets: str | None = None  # comma-separated, e.g. "flair"
    eval_available: str | None = None  # numbers of available inputs, e.g. "3"
    baseline_steps: int = 500


class ApiSettings(BaseModel):
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_volume_voxels: int = 512 * 512 * 512
    worker_heartbeat_seconds: float = 30.0  # /readyz wants a worker heartbeat younger than this
    # Untrusted files are checked in a forked child (api/core/sandbox.py) with these limits.
    parse_memory_bytes: int = 256 * 1024 * 1024  # address space the check may add to what it inherited
    parse_cpu_seconds: int = 20
    parse_timeout_seconds: float = 60.0
    # Admission control: requests per key and minute (all calls / submissions; 0 turns a limit off), queued
    # jobs in total (503 beyond) and active (queued + running) jobs per key (429 beyond).
    rate_limit_per_minute: int = 600
    submit_rate_limit_per_minute: int = 60
    max_queued_jobs: int = 1000
    max_active_jobs_per_key: int = 200
    # Threads that answer GET /jobs/{id} (the hot path, polled by every client) at once; more only contend for the
    # GIL (measured on 2 cores: 2 -> 689 req/s, 4 -> 635, 8 -> 538; docs/benchmarks.md section 3).
    status_threads: int = Field(default=2, ge=1)


# Series -> modality rules, tried in this order (first match wins), each a case-insensitive regular expression
# searched in SeriesDescription, ProtocolName and SequenceName (docs/imaging.md). FLAIR and contrast-enhanced T1 come
# first because their descriptions usually also say T2 / T1.
DEFAULT_SERIES_RULES: list[tuple[str, str]] = [
    ("flair", r"flair|(?<![a-z0-9])t2f(?![a-z0-9])|dark.?fluid|tirm"),
    ("t1ce", r"t1.*(\+c|(?<![a-z])(post|gd|gad\w*|contrast|ce)(?![a-z]))|(?<![a-z0-9])t1(c|ce|gd)(?![a-z0-9])"),
    ("t2", r"t2|(?<![a-z])tse(?![a-z])"),
    ("t1", r"t1|mprage|spgr|bravo"),
]


class DicomNode(BaseModel):
    """A PACS by name: its DICOMweb part (STOW-RS, QIDO-RS, WADO-RS), its DIMSE part (C-STORE, C-FIND, C-GET), or
    both (DICOMweb is used then). Secrets may come from files (``username_file``, ``password_file``); they are
    SecretStr, so a logged or printed node shows ``**********``."""

    dicomweb_url: str | None = None  # e.g. http://orthanc:8042/dicom-web
    username: SecretStr | None = None
    password: SecretStr | None = None
    username_file: Path | None = None
    password_file: Path | None = None
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None

    @model_validator(mode="after")
    def _check(self) -> DicomNode:
        if self.username_file is not None:
            self.username = SecretStr(self.username_file.read_text().strip())
        if self.password_file is not None:
            self.password = SecretStr(self.password_file.read_text().strip())
        dimse = (self.ae_title, self.host, self.port)
        if any(v is not None for v in dimse) and not all(v is not None for v in dimse):
            raise ValueError("a DIMSE node needs ae_title, host and port")
        if self.dicomweb_url is None and self.ae_title is None:
            raise ValueError("a node needs dicomweb_url or ae_title/host/port")
        return self

    @property
    def auth(self) -> tuple[str, str] | None:
        if self.username is None:
            return None
        return self.username.get_secret_value(), self.password.get_secret_value() if self.password else ""


class DicomSettings(BaseModel):
    """DICOM uploads: series rules and the zip-bomb limits (checked before anything is decompressed)."""

    series_rules: list[tuple[str, str]] = Field(default_factory=lambda: list(DEFAULT_SERIES_RULES))
    max_files: int = 4000  # DICOM files per request (zip entries included)
    max_uncompressed_bytes: int = 2 * 1024 * 1024 * 1024  # total of all zip entries, as declared and as read
    max_compression_ratio: float = 100.0  # per zip entry (a DICOM slice compresses 2-5x; bombs 1000x+)
    # PACS connections (docs/pacs.md): nodes by name (MSGLDM_DICOM__NODES, JSON), our AE title as SCU, deliveries
    nodes: dict[str, DicomNode] = Field(default_factory=dict)
    ae_title: str = "MSGLDM"  # calling AE title of C-STORE / C-FIND / C-GET
    network_timeout_seconds: float = 30.0
    delivery_max_attempts: int = 8
    delivery_backoff_seconds: float = 15.0  # first retry after this, doubling per attempt up to the cap
    delivery_backoff_max_seconds: float = 900.0
    delivery_lease_seconds: int = 300  # a delivery attempt in progress; the reaper re-publishes after it
    # C-STORE listener (python -m worker.listener; `make run` starts it when listener_port is set)
    listener_port: int | None = None
    listener_host: str = "127.0.0.1"
    listener_ae_title: str = "MSGLDM"
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)  # empty: the ae_title of each node
    stable_seconds: float = 30.0  # a study is complete when no instance arrived for this long
    auto_targets: str = "missing"  # "missing" (every modality the study lacks) or comma-separated modalities
    auto_deliver_to: str = ""  # comma-separated node names
    auto_preprocess: str = "auto"  # the preprocess option of the listener's jobs (auto|none|full, docs/imaging.md)
    listener_api_key: SecretStr | None = None  # the key owning the listener's jobs (or listener_api_key_file)
    listener_api_key_file: Path | None = None
    listener_spool: Path = VAR / "listener"

    @model_validator(mode="after")
    def _key_from_file(self) -> DicomSettings:
        if self.listener_api_key_file is not None:
            self.listener_api_key = SecretStr(self.listener_api_key_file.read_text().strip())
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSGLDM_", env_nested_delimiter="__", extra="ignore")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    log_level: str = "INFO"


@lru_cache
def get_settings() -> Settings:
    return Settings()
