"""A fresh stack's first steps and its UIs: S3 buckets a profile needs, Prefect's and MLflow's UIs.

``quantdag prepare`` creates the buckets of a profile's ``s3://`` artifact store (and any other
named ones, such as the MLflow server's artifact destination) before the first deployment run;
``quantdag ui`` serves Prefect's UI over this user's Prefect database (where ``quantdag run`` and
``quantdag demo`` record their flow runs) and MLflow's UI over a SQLite tracking store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def bucket_of(url: str) -> str:
    """``s3://bucket/prefix`` -> ``bucket``.

    Raises:
        ValueError: ``url`` is not an ``s3://`` (or ``s3a://``) URL with a bucket.
    """
    scheme, sep, rest = url.partition("://")
    bucket = rest.split("/", 1)[0]
    if scheme not in ("s3", "s3a") or not sep or not bucket:
        raise ValueError(f"{url!r} is not an S3 location: expected s3://<bucket>[/prefix]")
    return bucket


def ensure_buckets(urls: list[str]) -> dict[str, str]:
    """Create the S3 bucket of each URL that lacks one (endpoint and credentials from the usual
    AWS variables, ``AWS_ENDPOINT_URL`` for MinIO or moto).

    Returns:
        bucket -> ``created`` or ``exists``.

    Raises:
        ValueError: a URL is not ``s3://``.
        OSError: the endpoint refused (names the bucket and endpoint).
    """
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    done: dict[str, str] = {}
    for bucket in dict.fromkeys(bucket_of(url) for url in urls):
        fs.invalidate_cache()
        if fs.exists(bucket):
            done[bucket] = "exists"
            continue
        try:
            fs.mkdir(bucket)
        except Exception as err:  # noqa: BLE001 - botocore and s3fs raise many types; one message names the bucket
            endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS S3")
            raise OSError(f"cannot create bucket {bucket!r} at {endpoint}: {type(err).__name__}: {err}") from err
        done[bucket] = "created"
    return done


@dataclass
class UiProcess:
    """One UI server started by :func:`start_ui`: its name, URL and process (in its own process group)."""

    name: str
    url: str
    process: subprocess.Popen

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def ui_commands(prefect_port: int, mlflow_port: int, tracking_uri: str | None) -> dict[str, list[str]]:
    """The command lines of the UIs to start: Prefect's server (its UI on), and MLflow's UI when
    ``tracking_uri`` is a SQLite store (``None`` or a server: none). Each runs behind
    :mod:`quantdag.runtime.orphan_guard`: it ends with this process, also after ``kill -9``."""
    guarded = [sys.executable, "-m", "quantdag.runtime.orphan_guard", str(os.getpid())]
    commands = {"prefect": [*guarded, "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]}
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        commands["mlflow"] = [*guarded, "mlflow", "ui", "--host", "127.0.0.1", "--port", str(mlflow_port),
                              "--workers", "1", "--backend-store-uri", tracking_uri]
    return commands


def start_ui(name: str, argv: list[str], url: str, health: str, log: Path, timeout: float = 120.0) -> UiProcess:
    """Start one UI server in its own process group; return once ``health`` answers 200.

    Raises:
        RuntimeError: it exited or did not answer within ``timeout`` seconds (names its log).
    """
    env = {**os.environ, "PREFECT_UI_ENABLED": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("PREFECT_API_URL", None)  # the server of this user's database, not another API
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = UiProcess(name, url, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} UI exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return started
        except OSError:
            time.sleep(0.5)
    started.stop()
    raise RuntimeError(f"{name} UI did not answer {health} within {timeout:.0f} s; see {log}")
