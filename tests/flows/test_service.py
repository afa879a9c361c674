"""The service commands of ``quantdag``: ``prepare`` (a fresh stack's buckets and inputs, against moto
S3) and ``ui`` (Prefect's and MLflow's UIs over this machine's stores, as real servers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from services import free_port

BIN = Path(sys.executable).parent


def _profile(tmp_path: Path, artifact_store: str) -> Path:
    path = tmp_path / "fresh.yaml"
    path.write_text(yaml.safe_dump({
        "schema_version": 1, "name": "fresh", "base": {"local_dir": str(tmp_path / "model")},
        "text": {"path": str(tmp_path / "rows.jsonl")}, "eval": {"path": str(tmp_path / "eval.txt")},
        "artifact_store": artifact_store, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    return path


def test_prepare_creates_the_buckets_and_names_what_is_still_missing(s3_endpoint: str, tmp_path: Path) -> None:
    import s3fs

    bucket, other = f"fresh-{uuid.uuid4().hex[:8]}", f"mlflow-{uuid.uuid4().hex[:8]}"
    profile = _profile(tmp_path, f"s3://{bucket}/artifacts")
    from quantdag.runtime.deploy import missing_inputs
    from conf import load_profile

    before = missing_inputs(load_profile(str(profile)))  # what `prefect deploy` warns about
    assert any(f"S3 bucket {bucket!r}" in line and "quantdag prepare" in line for line in before), before

    first = CliRunner().invoke(app, ["prepare", str(profile), "--bucket", f"s3://{other}/artifacts"])
    assert first.exit_code == 0, first.output
    assert f"bucket {bucket}: created" in first.output and f"bucket {other}: created" in first.output
    assert s3fs.S3FileSystem(skip_instance_cache=True).exists(bucket)
    assert "still missing: base.local_dir" in first.output, "local inputs it cannot make are named"
    again = CliRunner().invoke(app, ["prepare", str(profile)])
    assert f"bucket {bucket}: exists" in again.output

    bad = CliRunner().invoke(app, ["prepare", str(profile), "--bucket", "/not/s3"])
    assert bad.exit_code == 1 and "is not an S3 location" in bad.output


@pytest.mark.slow
def test_ui_serves_prefect_and_mlflow_over_the_local_stores(tmp_path: Path) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "QUANTDAG_HOME": str(tmp_path / "home")}
    process = subprocess.Popen([str(BIN / "quantdag"), "ui", "--prefect-port", str(prefect_port), "--mlflow-port",
                                str(mlflow_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while "Ctrl-C stops them." not in lines and time.monotonic() < deadline and process.poll() is None:
            lines.append(process.stdout.readline().strip())
        assert "Ctrl-C stops them." in lines, lines
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in lines and f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in lines
        for url in (f"http://127.0.0.1:{prefect_port}/", f"http://127.0.0.1:{mlflow_port}/"):
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200 and b"<html" in response.read().lower(), url
    finally:
        process.send_signal(signal.SIGTERM)  # as `kill` does; Ctrl-C takes the same way out
        process.wait(timeout=60)
    for port in (prefect_port, mlflow_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
