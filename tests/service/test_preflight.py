"""Preflight probes fail fast and name the endpoint; revision overrides survive the CLI's JSON parsing."""

from __future__ import annotations

import time

import pytest

from quantdag.runtime.deploy import result_storage_basepath, result_storage_block_name, with_revision
from quantdag.runtime.preflight import PreflightError, check_s3, check_store, check_tracking


def _dead_url() -> str:
    from services import free_port

    return f"http://127.0.0.1:{free_port()}"


def test_dead_mlflow_fails_fast_naming_the_server() -> None:
    url = _dead_url()
    start = time.monotonic()
    with pytest.raises(PreflightError, match=f"MLflow tracking server {url} unreachable"):
        check_tracking(url)
    assert time.monotonic() - start < 10


def test_dead_s3_endpoint_fails_fast_naming_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    url = _dead_url()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    start = time.monotonic()
    with pytest.raises(PreflightError, match=f"at {url} \\(from AWS_ENDPOINT_URL\\)"):
        check_s3("s3://quantdag/artifacts", "artifact store")
    assert time.monotonic() - start < 15


def test_reachable_endpoints_pass(s3_endpoint: str, mlflow_server: str, tmp_path) -> None:
    check_s3("s3://quantdag/artifacts", "artifact store")
    check_tracking(mlflow_server)
    check_store(str(tmp_path / "artifacts"), "artifact store")
    with pytest.raises(PreflightError, match="'no-such-bucket'"):
        check_s3("s3://no-such-bucket/x", "artifact store")


def test_revision_override_keeps_strings_and_refuses_lossy_floats(tmp_path) -> None:
    from conf.schema import Profile

    profile = Profile.model_validate({"name": "t", "base": {"local_dir": str(tmp_path)}, "text": {"path": "x.jsonl"},
                                      "artifact_store": str(tmp_path), "tracking_uri": "sqlite:///x.db"})
    assert with_revision(profile, 12345).base.revision == "12345"
    assert with_revision(profile, "0a1b2c").base.revision == "0a1b2c"
    assert with_revision(profile, None) is profile
    with pytest.raises(ValueError, match="quote it"):
        with_revision(profile, 1.234e59)  # `--param revision=1234e56` arrives as this float


def test_result_storage_sits_beside_the_artifacts() -> None:
    assert result_storage_basepath("s3://quantdag/artifacts/") == "s3://quantdag/artifacts/prefect-results"
    name = result_storage_block_name("s3://quantdag/artifacts/prefect-results")
    assert name.startswith("quantdag-results-quantdag-artifacts-prefect-results-") and name == name.lower()
