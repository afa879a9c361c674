"""GPU slots against a real Prefect server: one free GPU among the visible ones per holder.

Each test makes its own ``gpu-<uuid>-<i>`` limits (``QUANTDAG_GPU_LIMIT_PREFIX``), so tests never
share a slot.
"""

from __future__ import annotations

import contextvars
import logging
import os
import subprocess
import sys
import threading
import uuid
from typing import Any, Callable, Iterator

import pytest
import torch

from quantdag.model import loading as modeling
from quantdag.runtime import devices
from quantdag.runtime.locks import GpuSlot, current_gpu, gpu_slots

HOLDER = """
import sys
from quantdag.runtime.locks import gpu_slots
with gpu_slots(poll=0.2) as slot:
    print(slot.name, slot.ordinal, flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def make_limits(prefix: str, devices: list[int]) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    names = [f"{prefix}-{device}" for device in devices]
    with get_client(sync_client=True) as client:
        for name in names:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return names


def active_slots(names: list[str]) -> list[int]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [client.read_global_concurrency_limit_by_name(name).active_slots for name in names]


def visible_gpus(monkeypatch: pytest.MonkeyPatch, visible: str, limited: list[int]) -> tuple[str, list[str]]:
    """Set ``CUDA_VISIBLE_DEVICES`` and a fresh limit prefix; create limits for ``limited`` only."""
    prefix = f"gpu-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("QUANTDAG_GPU_LIMIT_PREFIX", prefix)
    return prefix, make_limits(prefix, limited)


@pytest.fixture
def two_gpus(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """``CUDA_VISIBLE_DEVICES=0,1`` with fresh limits ``<prefix>-0`` and ``<prefix>-1`` (limit 1 each)."""
    from prefect.client.orchestration import get_client

    _, names = visible_gpus(monkeypatch, "0,1", [0, 1])
    yield names
    with get_client(sync_client=True) as client:
        for name in names:
            client.delete_global_concurrency_limit_by_name(name)


class Holder(threading.Thread):
    """Holds a GPU slot in a thread from :meth:`start` until :meth:`release`.

    The thread runs in a copy of the creating thread's context, as Prefect's task runners do, so
    it talks to the test's Prefect server. ``inside`` runs while the slot is held (its result in
    ``.inside``). Waiting in a thread keeps a test from hanging when a slot is never granted.
    """

    def __init__(self, inside: Callable[[], Any] | None = None) -> None:
        super().__init__(daemon=True)
        self._context = contextvars.copy_context()
        self._inside = inside
        self.acquired = threading.Event()
        self._release = threading.Event()
        self.slot: GpuSlot | None = None
        self.seen: GpuSlot | None = None
        self.inside: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self._context.run(self._hold)

    def _hold(self) -> None:
        try:
            with gpu_slots(poll=0.2) as slot:
                self.slot, self.seen = slot, current_gpu()
                self.inside = self._inside() if self._inside else None
                self.acquired.set()
                self._release.wait(60)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
            self.acquired.set()

    def holds(self, seconds: float) -> bool:
        """True once the slot is held within ``seconds``; raises what the thread raised."""
        got = self.acquired.wait(seconds)
        if self.error is not None:
            raise self.error
        return got

    def release(self) -> None:
        if self.ident is None:  # never started
            return
        self._release.set()
        self.join(30)
        assert not self.is_alive(), "the holder is still waiting for a slot"
        assert self.error is None, self.error


def test_two_holders_get_different_gpus_and_a_third_waits_for_the_released_one(
        two_gpus: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="prefect._internal.concurrency")
    process = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=os.environ.copy())
    mine, third = Holder(), Holder()
    try:
        name, ordinal = process.stdout.readline().split()
        assert (name, int(ordinal)) == (two_gpus[0], 0), "the first free GPU in CUDA_VISIBLE_DEVICES order"
        mine.start()
        assert mine.holds(15.0), "GPU 1 is free, yet no slot was granted"
        assert mine.slot == GpuSlot(two_gpus[1], 1) == mine.seen, "the other process holds GPU 0: this gets GPU 1"
        assert active_slots(two_gpus) == [1, 1]

        third.start()
        assert not third.holds(2.0), f"both GPUs are taken, yet the third got {third.slot}"
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "released"
        assert third.holds(10.0), "the third holder never got the released GPU"
        assert third.slot == GpuSlot(two_gpus[0], 0) == third.seen, "the third takes the GPU that was released"
        assert mine.slot == mine.seen and current_gpu() is None, "each thread sees its own GPU"
        mine.release()
        third.release()
        assert active_slots(two_gpus) == [0, 0]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, f"trying a taken GPU is routine, not an error: {errors[:2]}"
    finally:
        process.kill()
        process.wait()
        mine.release()
        third.release()


def test_holders_starting_at_the_same_moment_get_different_gpus(two_gpus: list[str]) -> None:
    holders = [Holder(), Holder()]
    for holder in holders:
        holder.start()
    try:
        for holder in holders:
            assert holder.holds(15.0)
        assert {holder.slot for holder in holders} == {GpuSlot(two_gpus[0], 0), GpuSlot(two_gpus[1], 1)}
        assert all(holder.seen == holder.slot for holder in holders)
    finally:
        for holder in holders:
            holder.release()
    assert active_slots(two_gpus) == [0, 0]


def test_a_missing_limit_fails_before_any_slot_is_taken_naming_the_command(prefect_api: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client

    prefix, (only,) = visible_gpus(monkeypatch, "0,1", [0])
    try:
        with pytest.raises(RuntimeError, match=f"prefect gcl create {prefix}-1 --limit 1") as raised, \
                gpu_slots(poll=0.2):
            pytest.fail("a slot was held although a visible GPU has no limit")
        assert f"{prefix}-0 --limit" not in str(raised.value), "only the missing limit needs creating"
        assert active_slots([only]) == [0], "GPU 0 is free, yet nothing may be left taken"
        assert current_gpu() is None
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(only)


def test_one_visible_gpu_is_held_at_ordinal_zero_and_a_second_holder_waits(prefect_api: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client

    _, (name,) = visible_gpus(monkeypatch, "3", [3])
    second = Holder()
    try:
        with gpu_slots(poll=0.2) as slot:
            assert slot == GpuSlot(name, 0) == current_gpu(), "CUDA_VISIBLE_DEVICES=3 is torch's cuda:0"
            second.start()
            assert not second.holds(1.5), "the only GPU is taken, yet a second holder got it"
            assert active_slots([name]) == [1]
        assert second.holds(10.0), "the second holder never got the released GPU"
        assert second.slot == GpuSlot(name, 0)
        second.release()
        assert active_slots([name]) == [0]
    finally:
        second.release()
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)


def test_no_visible_gpu_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with gpu_slots() as slot:
        assert slot is None and current_gpu() is None


def test_pick_device_follows_the_held_gpu(two_gpus: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """On this CPU-only machine the CUDA branch is reached by reporting CUDA as available."""
    real = torch.cuda.is_available()
    expected_auto = torch.device("cuda", 1) if real else torch.device("cpu")

    def picks() -> list[torch.device]:
        return [devices.pick_device(d) for d in ("auto", "cuda", "cpu", "cuda:0")]

    other = Holder()
    other.start()
    try:
        assert other.holds(15.0) and other.slot == GpuSlot(two_gpus[0], 0)
        if not real:
            unpatched = Holder(lambda: devices.pick_device("auto"))
            unpatched.start()
            assert unpatched.holds(15.0) and unpatched.slot.ordinal == 1
            unpatched.release()
            assert unpatched.inside == expected_auto, "no CUDA: auto stays on the CPU while a slot is held"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        mine = Holder(picks)
        mine.start()
        assert mine.holds(15.0) and mine.slot.ordinal == 1
        mine.release()
        assert mine.inside == [torch.device("cuda", 1), torch.device("cuda", 1), torch.device("cpu"),
                               torch.device("cuda", 0)], "cuda/auto follow the held GPU; explicit devices stay"
        assert devices.pick_device("auto") == torch.device("cuda"), "no slot held: the current device"
    finally:
        other.release()
