"""Leased step locks and GPU-slot names: a killed holder never blocks later runs for longer than its lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantdag.runtime.locks import LeaseLockManager, gpu_limit_names

HOLDER = """
import sys, time
from quantdag.runtime.locks import LeaseLockManager
manager = LeaseLockManager(sys.argv[1], lease=2.0, poll=0.1)
assert manager.acquire_lock("step-key", "holder-a")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["local", "s3"])
def lock_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "locks")
    request.getfixturevalue("s3_endpoint")
    return f"s3://quantdag/test-locks/{tmp_path.name}"


def test_lease_is_held_while_renewed_and_taken_over_after_kill_9(lock_root: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock_root], stdout=subprocess.PIPE, text=True,
                              env=os.environ.copy(), start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = LeaseLockManager(lock_root, lease=2.0, poll=0.1)
        assert other.is_locked("step-key")
        assert not other.acquire_lock("step-key", "holder-b", acquire_timeout=4.0), "a live holder keeps renewing"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    assert other.acquire_lock("step-key", "holder-b", acquire_timeout=10.0)
    waited = time.monotonic() - start
    assert waited < 4.0, f"took over {waited:.1f} s after the kill; the lease is 2 s"
    assert other.is_lock_holder("step-key", "holder-b")
    other.release_lock("step-key", "holder-b")
    assert not other.is_locked("step-key")


def test_only_the_holder_releases_and_waiters_see_the_release(lock_root: str) -> None:
    a = LeaseLockManager(lock_root, lease=5.0, poll=0.1)
    b = LeaseLockManager(lock_root, lease=5.0, poll=0.1)
    assert a.acquire_lock("k", "a")
    with pytest.raises(ValueError, match="not held by"):
        b.release_lock("k", "b")
    assert not b.wait_for_lock("k", timeout=0.5)
    a.release_lock("k", "a")
    assert b.wait_for_lock("k", timeout=2.0)
    assert b.acquire_lock("k", "b", acquire_timeout=1.0)
    b.release_lock("k", "b")


def test_gpu_limit_names_follow_cuda_visible_devices() -> None:
    assert gpu_limit_names({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["gpu-0", "gpu-1"]
    assert gpu_limit_names({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_limit_names({}) == []
    assert gpu_limit_names({"CUDA_VISIBLE_DEVICES": "3", "QUANTDAG_GPU_LIMIT_PREFIX": "gpu-node7"}) == ["gpu-node7-3"]


def test_gpu_slot_on_a_missing_limit_fails_strictly_naming_the_fix(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantdag.runtime.locks import gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "9")
    monkeypatch.setenv("QUANTDAG_GPU_LIMIT_PREFIX", "gpu-missing")
    with pytest.raises(RuntimeError, match="prefect gcl create gpu-missing-9 --limit 1"):
        with gpu_slots():
            pass
