"""One typed Settings object for the API, the worker and the CLIs (env prefix MSGLDM_, nesting with __).

The defaults are the embedded stack: SQLite under var/, objects under var/objects/, a Celery transport on a
SQLite file. Production (docker-compose.yml) sets PostgreSQL, Redis and MinIO through the same fields.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
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
    max_steps: int = 1000
    max_samples: int = 8


class JobSettings(BaseModel):
    lease_seconds: int = 60  # a running job's lease; the worker renews it every lease/4 seconds
    max_attempts: int = 3
    reaper_interval_seconds: float = 5.0
    soft_time_limit_seconds: int = 1800
    time_limit_seconds: int = 1900


class ApiSettings(BaseModel):
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_volume_voxels: int = 512 * 512 * 512
    worker_heartbeat_seconds: float = 30.0  # /readyz wants a worker heartbeat younger than this


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSGLDM_", env_nested_delimiter="__", extra="ignore")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    log_level: str = "INFO"


@lru_cache
def get_settings() -> Settings:
    return Settings()
