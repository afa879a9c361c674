"""Offline checks of the deployment files in infra/ (no Docker engine, no cluster).

Each ``*_problems`` function returns every problem it finds as a readable line (an
empty list means the file passed), so a failing test names all offenders at once.
``python infra/validate.py`` runs them all (and the Dockerfile checks of
buildcontext.py) and exits 1 on any problem.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from buildcontext import dockerfile_problems  # noqa: E402  (sibling module, infra/ is no package)

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent

# ---------------------------------------------------------------- compose.yaml

REQUIRED_SERVICES = ("postgres", "minio", "minio-init", "prefect-server", "mlflow", "gpu-worker")
ONE_SHOT_SERVICES = ("minio-init",)
# service -> {dependency: condition} that the start order relies on
REQUIRED_DEPENDS_ON = {
    "minio-init": {"minio": "service_healthy"},
    "prefect-server": {"postgres": "service_healthy"},
    "mlflow": {"postgres": "service_healthy", "minio-init": "service_completed_successfully"},
    "gpu-worker": {
        "prefect-server": "service_healthy",
        "mlflow": "service_healthy",
        "minio-init": "service_completed_successfully",
    },
}
WORKER_ENV = (
    "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REQUEST_CHECKSUM_CALCULATION",
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
ONLY_VAR_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?])[^}]*)?\}$")
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?[^}]*\}")
URL_USERINFO = re.compile(r"://([^/@\s]*):([^/@\s]*)@")
# In .env.example these must be empty or "change-me" (an access key ID may be a name).
SECRET_VALUE_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)
PLACEHOLDER_VALUES = {"", "change-me"}


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def env_map(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment`` as a dict, from either compose form (map or list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def option_value(args: list[str], option: str) -> str | None:
    """Value of ``--option=value`` or ``--option value`` in an argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and i + 1 < len(args):
            return args[i + 1]
    return None


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def secret_problems(doc: dict[str, Any]) -> list[str]:
    """Credentials must come from ``${VAR}``: secret-named env values and URL userinfo."""
    problems = []
    for name, svc in (doc.get("services") or {}).items():
        for key, value in env_map(svc).items():
            if SECRET_NAME.search(key) and value and not ONLY_VAR_REF.match(value):
                problems.append(f"{name}: {key} has an inline value, not ${{VAR}}")
        for text in _strings(svc):
            for user, password in URL_USERINFO.findall(text):
                for part in (user, password):
                    if not ONLY_VAR_REF.match(part):
                        problems.append(f"{name}: credential {part!r} inline in URL {text!r}")
    return problems


def compose_problems(doc: dict[str, Any], base: Path = INFRA) -> list[str]:
    """Structure the stack relies on: services, health, start order, GPU, env, secrets."""
    services = doc.get("services") or {}
    problems = [f"missing service {s}" for s in REQUIRED_SERVICES if s not in services]
    for name, svc in services.items():
        if name not in ONE_SHOT_SERVICES and not (svc.get("healthcheck") or {}).get("test"):
            problems.append(f"{name}: no healthcheck")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"{name}: depends_on without conditions")
            deps = {}
        for dep, spec in deps.items():
            cond = (spec or {}).get("condition")
            target = services.get(dep, {})
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif cond == "service_healthy" and not (target.get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {dep} to be healthy, but it has no healthcheck")
        for dep, cond in REQUIRED_DEPENDS_ON.get(name, {}).items():
            if (deps.get(dep) or {}).get("condition") != cond:
                problems.append(f"{name}: needs depends_on {dep}: condition {cond}")
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source.startswith((".", "/")) and not (base / source).exists():
                problems.append(f"{name}: bind-mount source {source} does not exist")
        build = svc.get("build")
        if build:
            ctx = base / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
    problems += _worker_problems(services.get("gpu-worker") or {})
    problems += _server_problems(services)
    problems += secret_problems(doc)
    return problems


def _worker_problems(worker: dict[str, Any]) -> list[str]:
    problems = []
    args = command_args(worker)
    if args[:3] != ["prefect", "worker", "start"] or option_value(args, "--pool") != "gpu" \
            or option_value(args, "--type") != "process":
        problems.append(f"gpu-worker: command is not `prefect worker start --pool gpu --type process`: {args}")
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
        problems.append("gpu-worker: no deploy.resources.reservations.devices entry with driver nvidia, capabilities [gpu]")
    env = env_map(worker)
    problems += [f"gpu-worker: env {k} missing" for k in WORKER_ENV if k not in env]
    if env.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required") != "when_required":
        problems.append("gpu-worker: AWS_REQUEST_CHECKSUM_CALCULATION must be when_required (MinIO)")
    if not str((worker.get("build") or {}).get("dockerfile", "")).endswith("worker.Dockerfile"):
        problems.append("gpu-worker: not built from infra/worker.Dockerfile")
    return problems


def _server_problems(services: dict[str, Any]) -> list[str]:
    problems = []
    mlflow = services.get("mlflow") or {}
    args, env = command_args(mlflow), env_map(mlflow)
    if not (option_value(args, "--backend-store-uri") or "").startswith("postgresql://"):
        problems.append("mlflow: --backend-store-uri is not postgresql://")
    if option_value(args, "--artifacts-destination") != "s3://mlflow/":
        problems.append("mlflow: --artifacts-destination is not s3://mlflow/")
    if "MLFLOW_S3_ENDPOINT_URL" not in env:
        problems.append("mlflow: env MLFLOW_S3_ENDPOINT_URL missing")
    if env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") != "false":
        problems.append("mlflow: MLFLOW_SERVER_ENABLE_JOB_EXECUTION must be \"false\"")
    prefect = services.get("prefect-server") or {}
    if command_args(prefect)[:3] != ["prefect", "server", "start"]:
        problems.append("prefect-server: command is not `prefect server start`")
    url = env_map(prefect).get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    if not url.startswith("postgresql+asyncpg://"):
        problems.append("prefect-server: PREFECT_API_DATABASE_CONNECTION_URL is not postgresql+asyncpg://")
    if "mc mb" not in " ".join(_strings(services.get("minio-init") or {})):
        problems.append("minio-init: creates no bucket (`mc mb`)")
    return problems


def required_variables(doc: dict[str, Any]) -> set[str]:
    """Variables that compose.yaml interpolates with ``${VAR:?...}`` (no default)."""
    return {name for text in _strings(doc) for name, op in VAR_REF.findall(text) if op in (":?", "?")}


def env_example_problems(doc: dict[str, Any], example_text: str) -> list[str]:
    """Every required variable has a line in .env.example, and no secret has a value."""
    values = {}
    for line in example_text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    problems = [f".env.example lacks {v}, which compose.yaml requires"
                for v in sorted(required_variables(doc)) if v not in values]
    problems += [f".env.example: {k} holds a real-looking value; ship a placeholder"
                 for k, v in values.items() if SECRET_VALUE_NAME.search(k) and v not in PLACEHOLDER_VALUES]
    return problems


# ---------------------------------------------------------------- Prefect k8s template

# Prefect's own placeholder syntax (prefect.utilities.templating), kept here so the
# check does not depend on an internal module.
PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")


def template_variables(job_configuration: Any) -> set[str]:
    """Job variables that ``{{ name }}`` placeholders refer to (not blocks, variables, env)."""
    names = set(PLACEHOLDER.findall(json.dumps(job_configuration)))
    return {n for n in names if not n.startswith(("prefect.", "$"))}


def k8s_template_problems(template: dict[str, Any]) -> list[str]:
    problems = []
    if set(template) != {"job_configuration", "variables"}:
        return [f"top-level keys must be job_configuration and variables, not {sorted(template)}"]
    used = template_variables(template["job_configuration"])
    declared = set(template["variables"].get("properties", {}))
    problems += [f"placeholder {{{{ {v} }}}} has no variables.properties entry" for v in sorted(used - declared)]
    problems += [f"variable {v} is declared but never used in job_configuration" for v in sorted(declared - used)]
    missing_required = set(template["variables"].get("required", [])) - declared
    problems += [f"required variable {v} is not declared" for v in sorted(missing_required)]
    container = _first_container(template["job_configuration"])
    if container is None:
        return problems + ["job_manifest has no container"]
    if "nvidia.com/gpu" not in ((container.get("resources") or {}).get("limits") or {}):
        problems.append("container resources.limits has no nvidia.com/gpu")
    return problems


def _first_container(job_configuration: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    except (KeyError, IndexError, TypeError):
        return None


def render_job_configuration(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """Fill the template the way a Prefect worker does: schema defaults, then overrides.

    Keys whose placeholder has neither a value nor a default are dropped (Prefect's
    ``apply_values(..., remove_notset=True)``).
    """
    from prefect.utilities.templating import apply_values

    props = template["variables"].get("properties", {})
    values = {k: p["default"] for k, p in props.items() if p.get("default") is not None}
    values.update(job_variables)
    return apply_values(copy.deepcopy(template["job_configuration"]), values, remove_notset=True)


# ---------------------------------------------------------------- CLI

def main() -> int:
    compose = load_yaml(INFRA / "compose.yaml")
    problems = [f"compose.yaml: {p}" for p in compose_problems(compose)]
    problems += [f"env: {p}" for p in env_example_problems(compose, (INFRA / ".env.example").read_text())]
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    problems += [f"base-job-template.json: {p}" for p in k8s_template_problems(template)]
    problems += [f"worker.Dockerfile: {p}" for p in dockerfile_problems(INFRA / "worker.Dockerfile")]
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
