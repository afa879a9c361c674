"""``calibration_gpus: 2`` on the CPU: one call in the flow's process, one in a worker that preloaded the base.

The tiny Llama (text only) with ``text.shards: 2``: the flow's call calibrates ``text[0]`` on the
model the BF16 reference left in the flow's process; the worker preloads the base while the
reference runs and calibrates ``text[1]`` on it. The export must be the bytes of the one-load run.
"""

from __future__ import annotations

import uuid

import pytest

from conf import load_profile
from tiny_models import write_corpus, write_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, mlflow_server: str, s3_endpoint: str):
    root = tmp_path_factory.mktemp("layout")
    rows, heldout = write_corpus(root / "data")
    return load_profile("demo", {
        "name": "layout-test", "base": {"local_dir": str(write_tiny_llama(root / "llama"))},
        "text": {"path": str(rows), "num_samples": 8, "seq_len": 64}, "eval": {"path": str(heldout), "max_windows": 2},
        "artifact_store": f"s3://quantdag/layout-{uuid.uuid4().hex[:8]}", "tracking_uri": mlflow_server, "device": "cpu",
    })


def _children(result: dict, tracking_uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("quantdag").experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    return {run.data.tags["quantdag.step"]: run.data.metrics for run in runs}


def test_gpu_calls_preload_in_the_worker_and_give_the_one_load_checkpoint(profile, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows import calibration_layout
    from flows.quantize import quantize

    baseline = quantize(profile)
    monkeypatch.setattr(calibration_layout, "PRELOAD_GRACE_SECONDS", 0.0)  # the tiny reference computes in < 3 s
    pooled = profile.model_copy(update={"calibration_gpus": 2, "artifact_store": f"{profile.artifact_store}-pooled",
                                        "text": profile.text.model_copy(update={"shards": 2})})
    result = quantize(pooled)
    assert result["checkpoint"]["sha256"] == baseline["checkpoint"]["sha256"], "same bytes as the one-load run"
    steps = _children(result, profile.tracking_uri)
    here, worker = steps["calibrate_text[0]"], steps["calibrate_text[1]"]
    assert (here["model_loads"], here["preloaded"]) == (0.0, 0.0), "the flow's call takes the reference's model"
    assert (worker["model_loads"], worker["preloaded"]) == (1.0, 1.0), "the worker's call takes its preloaded model"
    assert result["metrics"]["model_loads"] == baseline["metrics"]["model_loads"] + 1, \
        "one more load than the one-load run: the worker GPU's preload (the flow's call took the reference's model)"
