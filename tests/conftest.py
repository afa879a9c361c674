"""Session fixtures: real Prefect, MLflow and S3 (moto) servers, started once and stopped by
process group; task retries off."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from services import Service, start_mlflow, start_moto, start_prefect  # noqa: E402

os.environ.setdefault("QUANTDAG_TASK_RETRIES", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("QUANTDAG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def s3_endpoint(service_dir: Path):
    """A moto_server S3 endpoint with buckets ``quantdag`` and ``mlflow``; sets AWS_ENDPOINT_URL."""
    import boto3

    service = start_moto(service_dir)
    os.environ["AWS_ENDPOINT_URL"] = service.url
    client = boto3.client("s3", endpoint_url=service.url)
    for bucket in ("quantdag", "mlflow"):
        client.create_bucket(Bucket=bucket)
    yield service.url
    service.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def prefect_api(service_dir: Path):
    """A real Prefect server; the whole session's Prefect client talks to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = service_dir / "prefect-home"
    home.mkdir(exist_ok=True)
    service: Service = start_prefect(service_dir, home)
    os.environ["PREFECT_API_URL"] = service.url
    with temporary_settings(updates={PREFECT_API_URL: service.url}):
        yield service.url
    service.stop()


@pytest.fixture(scope="session")
def mlflow_server(service_dir: Path, s3_endpoint: str) -> str:
    """A real MLflow tracking server (SQLite backend, artifacts on the moto S3 bucket)."""
    home = service_dir / "mlflow-home"
    home.mkdir(exist_ok=True)
    service = start_mlflow(service_dir, home, "s3://mlflow/artifacts", s3_endpoint)
    yield service.url
    service.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real cnn_dailymail / WikiText-2 rows live there)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _no_model_kept_between_tests():
    """Drop the model a model step kept in this process (``quantdag.model.warm``) after each test."""
    yield
    from quantdag.model import warm

    warm.release()
