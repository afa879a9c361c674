"""Service fixtures: the shipped ``prefect.yaml`` deployed to the session's Prefect server, a tiny
model behind the ``demo`` profile, and a ``process`` worker in its own process group.

Settings that only make the tests faster: the worker polls every second, MLflow heartbeats every
second (a run is stale after 10 s), step leases last 6 s, GPU-slot leases the 60 s minimum.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Stack, cli, kill_flow_run_processes  # noqa: E402
from services import Service, start_worker  # noqa: E402
from tiny import build_tiny_workspace  # noqa: E402

POOL = "quantdag-gpu"
FAKE_SECRETS = {"HF_TOKEN": "hf_quantdagFAKEtoken0123456789", "AWS_SECRET_ACCESS_KEY": "quantdag-FAKE-aws-secret-987654",
                "MLFLOW_TRACKING_PASSWORD": "quantdag-FAKE-mlflow-password-135"}
"""Planted in every worker's environment; no store of the stack may ever hold one of them."""
PLANTED_URL_PASSWORD = "quantdag-FAKE-url-password-2468"
"""Offered in a profile URL (``http://user:<this>@host``); refused, so no store may hold it either."""
FAST = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "QUANTDAG_HEARTBEAT_SECONDS": "1",
    "QUANTDAG_STALE_AFTER_SECONDS": "10",
    "QUANTDAG_LOCK_LEASE_SECONDS": "6",
    "QUANTDAG_GPU_LEASE_SECONDS": "60",
    "QUANTDAG_TASK_RETRIES": "0",
}


class Workers:
    """The process worker(s) of the pool; one runs at a time, a new one gets a fresh PREFECT_HOME."""

    def __init__(self, service_dir: Path) -> None:
        self.service_dir = service_dir
        self.current: Service | None = None
        self.count = 0

    def start(self, name: str) -> Service:
        self.count += 1
        home = self.service_dir / f"worker-home-{self.count}"
        home.mkdir(exist_ok=True)
        env = {**FAST, **FAKE_SECRETS, "MLFLOW_TRACKING_USERNAME": "quantdag", "PREFECT_HOME": str(home)}
        self.current = start_worker(self.service_dir, POOL, name, env)
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def stack(prefect_api: str, mlflow_server: str, s3_endpoint: str, service_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``prefect deploy --all`` of the repository's prefect.yaml, then one worker on its pool."""
    home = build_tiny_workspace(tmp_path_factory.mktemp("quantdag-home"))
    fault_dir = tmp_path_factory.mktemp("faults")
    cli_home = service_dir / "cli-home"
    cli_home.mkdir(exist_ok=True)
    cli_env = {"PREFECT_HOME": str(cli_home), "QUANTDAG_HOME": str(home),
               "QUANTDAG_ARTIFACTS": "s3://quantdag/artifacts", "MLFLOW_TRACKING_URI": mlflow_server}
    cli("work-pool", "create", POOL, "--type", "process", "--overwrite", env=cli_env)
    cli("deploy", "--all", env=cli_env, timeout=600)
    for name in ("gpu-1", "gpu-2", "gpu-3", "gpu-4"):  # one per killed run of the kill -9 chain
        cli("global-concurrency-limit", "create", name, "--limit", "1", env=cli_env)
    deployment = json.loads(cli("deployment", "inspect", "quantize/demo", "--output", "json", env=cli_env).stdout)
    workers = Workers(service_dir)
    workers.start("main")
    result = Stack(prefect_api, mlflow_server, s3_endpoint, home, fault_dir,
                   deployment["job_variables"]["env"], cli_env, workers=workers)
    yield result
    workers.stop()
    kill_flow_run_processes(result.flow_runs)  # flow runs live in sessions of their own
