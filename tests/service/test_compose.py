"""docker-compose.yml against the code: services, health checks, start order, and every MSGLDM_* variable
naming a real Settings field (no Docker engine runs here, so this and `docker-compose config` are the check)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from pydantic import BaseModel

from api.core.settings import Settings
from tests.service.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ONE_SHOT = {name for name, s in SERVICES.items() if s.get("restart") == "no"}


def resolve(value: str) -> str:
    """${VAR:-default} -> default, as compose does with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def settings_field_exists(path: list[str]) -> bool:
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_the_services_of_the_design_card():
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api"} <= set(SERVICES)
    workers = [n for n in SERVICES if n.startswith("worker")]
    assert workers, "no worker service"
    for name in workers:
        devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and len(devices[0]["device_ids"]) == 1  # one GPU each
        command = SERVICES[name].get("command") or []
        assert "-c" not in command or command[command.index("-c") + 1] == "1"


def test_the_training_worker():
    """Runs take the training queue only and every GPU of their host (DDP); they see the datasets the API validates."""
    trainer = SERVICES["trainer"]
    command = trainer["command"]
    assert command[command.index("-Q") + 1] == "training" and command[command.index("-c") + 1] == "1"
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    datasets = [v for v in trainer["volumes"] if v.endswith(":/datasets:ro")]
    assert datasets and datasets[0] in SERVICES["api"]["volumes"]
    for name in SERVICES:
        if name.startswith("worker"):
            q = SERVICES[name].get("command") or ["-Q", "inference"]
            assert q[q.index("-Q") + 1] == "inference", name


def test_health_checks_and_start_order():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name, service in SERVICES.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {dep}"
    api_deps = SERVICES["api"]["depends_on"]
    assert api_deps["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["command"][-2:] == ["api.cli", "migrate"]


def test_environment_names_are_settings_fields():
    seen = set()
    for name, service in SERVICES.items():
        for key in service.get("environment") or {}:
            if not key.startswith("MSGLDM_"):
                continue
            seen.add(key)
            path = key.removeprefix("MSGLDM_").lower().split("__")
            assert settings_field_exists(path), f"{name}: {key} is not a Settings field"
    assert {"MSGLDM_DATABASE__URL", "MSGLDM_BROKER__URL", "MSGLDM_STORAGE__BACKEND"} <= seen


def test_environment_values_validate(monkeypatch: pytest.MonkeyPatch):
    for key, value in SERVICES["api"]["environment"].items():
        monkeypatch.setenv(key, resolve(value))
    settings = Settings()
    assert settings.database.url.startswith("postgresql+psycopg://")
    assert settings.broker.url.startswith("redis://") and settings.storage.backend == "s3"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_dockerfile_targets():
    text = (ROOT / "Dockerfile").read_text()
    assert "AS api" in text and "AS worker" in text
    api_stage = text.split("AS api")[1].split("FROM")[0]
    assert "[model]" not in api_stage, "the API image must not install torch"
    for name in ("migrate", "api"):
        assert SERVICES[name]["build"]["target"] == "api"
