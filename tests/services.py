"""Real servers for the tests: Prefect server, MLflow server, moto_server (S3).

Each runs in its own process group (``start_new_session``) and is stopped by killing the group,
so workers and gunicorn children never outlive the test session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def start(name: str, argv: list[str], health_url: str, base_url: str, log_dir: Path, env: dict[str, str],
          timeout: float = 90.0) -> Service:
    """Start ``argv`` in a new process group and wait until ``health_url`` answers 200."""
    log = log_dir / f"{name}.log"
    handle = open(log, "w")
    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env},
                               start_new_session=True)
    service = Service(name, base_url, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return service
        except OSError:
            time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")


def start_moto(log_dir: Path) -> Service:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                 f"{url}/moto-api/", url, log_dir, {})


def start_prefect(log_dir: Path, home: Path) -> Service:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",  # tests/service/test_browser.py opens its run pages
        "PREFECT_API_URL": f"{url}/api",
    }
    return start("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 f"{url}/api/health", f"{url}/api", log_dir, env)


def start_mlflow(log_dir: Path, home: Path, artifacts_destination: str, s3_endpoint: str) -> Service:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--artifacts-destination", artifacts_destination]
    return start("mlflow", argv, f"{url}/health", url, log_dir, env)


def start_worker(log_dir: Path, pool: str, name: str, env: dict[str, str] | None = None,
                 timeout: float = 60.0, limit: int | None = None, cwd: Path | None = None) -> Service:
    """Start ``prefect worker start --pool POOL --type process`` in its own process group.

    Ready when the worker has registered with the API (its log says it started). ``env`` is added
    to this process's environment (``PREFECT_API_URL`` must be in one of them). Flow runs it
    starts live in sessions of their own (Prefect isolates them), so stopping the worker's group
    does not stop them. ``limit``: flow runs it runs at once (``--limit``); ``cwd``: its working
    directory (and its flow runs').
    """
    log = log_dir / f"worker-{name}.log"
    handle = open(log, "w")
    argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    argv += ["--limit", str(limit)] if limit is not None else []
    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                               start_new_session=True, cwd=cwd)
    service = Service(f"worker-{name}", "", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {process.returncode}; log:\n{log.read_text()[-3000:]}")
        if "started!" in log.read_text():
            return service
        time.sleep(0.3)
    service.stop()
    raise RuntimeError(f"worker {name} not ready after {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")
