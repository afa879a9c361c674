"""Calibration workers bound to one GPU each: every task call sees only its GPU."""

from __future__ import annotations

import pytest
from prefect import flow, task

from quantdag.runtime.gpu_pool import GpuWorker, visible_gpus, worker_gpus


@task
def _visible() -> str:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


@flow
def _on_worker() -> list[str]:
    with GpuWorker("5") as five:
        futures = [five.submit(_visible, {}), five.submit(_visible, {})]
        return [_visible(), *(future.result() for future in futures)]


@pytest.mark.slow
def test_every_call_of_a_worker_sees_only_its_gpu(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3,5")
    assert _on_worker() == ["0,3,5", "5", "5"], "the flow's process keeps every GPU; the worker's calls see GPU 5"


def test_workers_get_the_gpus_after_the_flows_own() -> None:
    assert worker_gpus(1, {"CUDA_VISIBLE_DEVICES": "2,4,6"}) == ["4"]
    assert worker_gpus(2, {"CUDA_VISIBLE_DEVICES": ""}) == [None, None], "CPU host: no GPU to bind"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    with pytest.raises(ValueError, match="3 calibration GPUs wanted but CUDA_VISIBLE_DEVICES holds 2 .*lower calibration_gpus"):
        worker_gpus(2, {"CUDA_VISIBLE_DEVICES": "0,1"})
