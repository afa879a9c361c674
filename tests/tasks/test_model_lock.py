"""``_on_gpu``: one model step at a time per process, lock before GPU slot, memory freed after; only
steps declared ``quantdag_task(..., model_step=True)`` get it."""

from __future__ import annotations

import contextvars
import gc
import threading
import time
import traceback
import uuid
import weakref
from typing import Any, Iterator

import pytest
import torch

from quantdag.model import loading as modeling
from quantdag.runtime import devices
from quantdag.runtime.locks import GpuSlot, current_gpu, gpu_slots
from quantdag.runtime.prefect_task import MODEL_LOCK, _on_gpu, quantdag_task


@pytest.fixture
def two_gpus(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """``CUDA_VISIBLE_DEVICES=0,1`` with fresh limits ``<prefix>-0`` and ``<prefix>-1`` (limit 1 each)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    prefix = f"gpu-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("QUANTDAG_GPU_LIMIT_PREFIX", prefix)
    monkeypatch.setenv("QUANTDAG_GPU_POLL_SECONDS", "0.2")
    names = [f"{prefix}-0", f"{prefix}-1"]
    with get_client(sync_client=True) as client:
        for name in names:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    yield names
    with get_client(sync_client=True) as client:
        for name in names:
            client.delete_global_concurrency_limit_by_name(name)


def active_slots(names: list[str]) -> list[int]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [client.read_global_concurrency_limit_by_name(name).active_slots for name in names]


def in_thread(target: Any, *args: Any) -> threading.Thread:
    """Start ``target`` in a thread that runs in a copy of this context (as Prefect's task runners do)."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(target, *args), daemon=True)
    thread.start()
    return thread


def call(fn: Any, *args: Any, timeout: float = 30.0) -> Any:
    """``fn(*args)`` in a thread of this context: its result, or what it raised; fails after ``timeout`` s."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised below
            outcome["error"] = err

    in_thread(run).join(timeout)
    if not outcome:
        pytest.fail(f"{fn.__name__} did not return within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_two_model_steps_in_threads_never_overlap_and_a_waiter_holds_no_gpu(two_gpus: list[str]) -> None:
    spans: dict[str, tuple[float, float]] = {}
    slots: dict[str, GpuSlot | None] = {}
    first_inside, let_first_finish = threading.Event(), threading.Event()

    @_on_gpu
    def step(name: str, device: str = "auto") -> str:
        enter = time.monotonic()
        slots[name] = current_gpu()
        if name == "first":
            first_inside.set()
            assert let_first_finish.wait(30)
        else:
            time.sleep(0.3)
        spans[name] = (enter, time.monotonic())
        return name

    first = in_thread(step, "first")
    assert first_inside.wait(15)
    second = in_thread(step, "second")
    time.sleep(1.5)  # the second thread is waiting by now
    assert "second" not in slots, "the second step ran while the first was inside"
    assert sorted(active_slots(two_gpus)) == [0, 1], "a step waiting for the model lock must not hold a GPU slot"
    let_first_finish.set()
    first.join(15)
    second.join(15)
    assert not first.is_alive() and not second.is_alive()
    (a_in, a_out), (b_in, b_out) = spans["first"], spans["second"]
    assert a_out <= b_in or b_out <= a_in, f"model steps overlapped: {spans}"
    assert slots["first"] == slots["second"] == GpuSlot(two_gpus[0], 0), "the freed GPU is taken again"
    assert active_slots(two_gpus) == [0, 0]


class Model:
    """Stands for a model: its self-reference makes only ``gc.collect()`` free it."""

    def __init__(self) -> None:
        self.me = self


def test_memory_of_a_step_is_freed_after_it_returns_and_after_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    refs: list[weakref.ref] = []

    @_on_gpu
    def step(fail: bool, device: str = "cpu") -> None:
        model = Model()
        refs.append(weakref.ref(model))
        if fail:
            raise ValueError("calibration diverged")

    gc.disable()  # only the wrapper's own gc.collect() may free the cycle
    try:
        step(False)
        assert refs[-1]() is None, "the model of a finished step is still alive"
        with pytest.raises(ValueError, match="calibration diverged") as raised:
            step(True)
        assert refs[-1]() is None, "the exception's traceback keeps the failed step's model alive"
        printed = "".join(traceback.format_exception(raised.value))
        assert 'raise ValueError("calibration diverged")' in printed, "the traceback still prints"

        def caller_failure() -> None:
            kept = Model()
            refs.append(weakref.ref(kept))
            raise KeyError("the caller's own error")

        try:
            caller_failure()
        except KeyError:
            kept_ref = refs[-1]
            with pytest.raises(ValueError):
                step(True)
            assert kept_ref() is not None, "the error the caller is handling must keep its frames"
    finally:
        gc.enable()


def test_the_held_gpu_becomes_the_current_device_and_its_cache_is_emptied(
        two_gpus: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no GPU: CUDA is reported available and the two CUDA calls are recorded."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda ordinal: calls.append(("set_device", ordinal)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty_cache", None)))
    holding, release = threading.Event(), threading.Event()

    def hold_gpu_0() -> None:
        with gpu_slots(poll=0.2):
            holding.set()
            release.wait(30)

    other = in_thread(hold_gpu_0)
    try:
        assert holding.wait(15)

        @_on_gpu
        def step(fail: bool, device: str = "auto") -> torch.device:
            calls.append(("body", devices.pick_device(device)))
            if fail:
                raise RuntimeError("out of memory")
            return devices.pick_device(device)

        assert call(step, False) == torch.device("cuda", 1)
        assert calls == [("set_device", 1), ("body", torch.device("cuda", 1)), ("empty_cache", None)]
        calls.clear()
        with pytest.raises(RuntimeError, match="out of memory"):
            call(step, True)
        assert calls == [("set_device", 1), ("body", torch.device("cuda", 1)), ("empty_cache", None)]
        assert active_slots(two_gpus) == [1, 0]
    finally:
        release.set()
        other.join(15)


def test_only_a_step_declared_a_model_step_runs_under_the_model_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: no slot to take, no server needed

    def loads_a_model(rows: int) -> bool:
        return MODEL_LOCK.locked()

    def takes_a_device(device: str = "cpu") -> bool:
        return MODEL_LOCK.locked()

    declared = quantdag_task("declared_model_step", model_step=True)(loads_a_model)
    undeclared = quantdag_task("undeclared_step")(takes_a_device)
    assert declared.fn(4) is True, "a declared model step runs under this process's model lock"
    assert not MODEL_LOCK.locked(), "the lock is given back after the step"
    assert undeclared.fn() is False, "a parameter named device no longer makes a step a model step"
