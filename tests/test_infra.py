"""Static checks of infra/: compose.yaml, .env.example and the Dockerfile (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
COMPOSE_TEXT = (INFRA / "compose.yaml").read_text(encoding="utf-8")
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
DIGEST = re.compile(r"^[^\s@]+:[^\s@]+@sha256:[0-9a-f]{64}$")
# `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$VAR`, but not `$$` (a literal `$`).
VAR_REF = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
SECRET_KEYS = ("PASSWORD", "SECRET", "ACCESS_KEY", "ROOT_USER")


def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key] = value
    return values


def walk(node, path=()):
    """(path, value) of every scalar in the parsed compose file (comments are not in it)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, str(i)))
    else:
        yield path, node


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment should be a mapping"
    return {k: str(v) for k, v in env.items()}


def test_services_present():
    expected = {"minio", "mc-init", "postgres", "prefect-server", "worker-cpu", "worker-gpu"}
    assert expected <= set(SERVICES)


@pytest.mark.parametrize("service", ["minio", "mc-init"])
def test_minio_images_pinned_by_digest(service):
    image = SERVICES[service]["image"]
    assert DIGEST.match(image), f"{service}: {image!r} is not pinned by tag and @sha256 digest"
    assert "$" not in image


def test_every_variable_is_in_env_example():
    strings = [v for _, v in walk(COMPOSE) if isinstance(v, str)]
    used = {a or b for text in strings for a, b in VAR_REF.findall(text)}
    assert used, "compose.yaml should be configured from .env"
    missing = used - set(env_example())
    assert not missing, f"used in compose.yaml, missing from .env.example: {sorted(missing)}"


def test_env_example_has_a_comment_for_each_block_and_placeholder_secrets():
    text = (INFRA / ".env.example").read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#") and not lines[i - 1].startswith("#"):
            # A variable without a comment right above must share one with the line above it.
            assert "=" in lines[i - 1], f".env.example: no comment for {line!r}"
    for key, value in env_example().items():
        if any(s in key for s in ("PASSWORD", "SECRET")):
            assert value.startswith("change-me"), f"{key} should be a change-me placeholder"


def test_no_literal_secrets_in_compose():
    for path, value in walk(COMPOSE):
        key = path[-1].upper()
        if any(s in key for s in SECRET_KEYS):
            assert isinstance(value, str) and value.startswith("${"), (
                f"{'.'.join(path)} must come from .env, not be written in compose.yaml"
            )
    # Nor any value of a secret from .env.example, nor the usual MinIO defaults.
    for key, value in env_example().items():
        if any(s in key for s in SECRET_KEYS):
            assert value not in COMPOSE_TEXT, f"the value of {key} is written in compose.yaml"
    assert "minioadmin" not in COMPOSE_TEXT
    db_url = environment("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://${POSTGRES_USER")
    assert "${POSTGRES_PASSWORD" in db_url


def test_gpu_worker_reserves_an_nvidia_gpu_and_uses_cuda():
    worker = SERVICES["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert all(d.get("count", "all") == "all" or int(d["count"]) >= 1 for d in devices)
    assert environment("worker-gpu")["DEVICE"] == "cuda"
    assert worker["command"][-4:] == ["--pool", "gpu", "--type", "process"]


def test_cpu_worker_uses_cpu():
    worker = SERVICES["worker-cpu"]
    assert environment("worker-cpu")["DEVICE"] == "cpu"
    assert "deploy" not in worker
    assert worker["command"][-4:] == ["--pool", "cpu", "--type", "process"]


@pytest.mark.parametrize("service", ["worker-cpu", "worker-gpu"])
def test_workers_talk_to_the_stack(service):
    env = environment(service)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["WEIGHTSMITH_STORE"].startswith("${WEIGHTSMITH_STORE")
    assert env_example()["WEIGHTSMITH_STORE"].startswith("s3://")
    assert SERVICES[service]["build"]["dockerfile"] == "infra/Dockerfile"
    depends = SERVICES[service]["depends_on"]
    assert depends["prefect-server"]["condition"] == "service_healthy"
    assert depends["mc-init"]["condition"] == "service_completed_successfully"


def test_one_shots_and_healthchecks():
    assert SERVICES["mc-init"]["restart"] == "no"
    assert SERVICES["mc-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "WEIGHTSMITH_BUCKETS" in environment("mc-init")
    for service in ("minio", "postgres", "prefect-server"):
        assert "healthcheck" in SERVICES[service], f"{service}: no healthcheck"
    assert any("/api/health" in part for part in SERVICES["prefect-server"]["healthcheck"]["test"])
    env = environment("prefect-server")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["PREFECT_SERVER_API_HOST"] == "0.0.0.0"
    assert re.match(r"^postgres:\d+", SERVICES["postgres"]["image"])


def test_dockerfile_installs_torch_first_then_the_project():
    text = (INFRA / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    torch = text.index('"torch==${TORCH_VERSION}"')
    assert "--index-url" in text[text.rindex("RUN", 0, torch) : torch]
    assert torch < text.index("RUN pip install .")
    pin = re.search(r'"torch==([^"]+)"', (INFRA.parent / "pyproject.toml").read_text())
    assert pin and pin.group(1) == "2.13.0", "Dockerfile and pyproject.toml pin the same torch"
