"""Shared Prefect settings for quantdag's tasks: cache policy, persistence, retries.

Every step is cached across flow runs on its inputs plus its source plus the code version
(``quantdag.version.code_version``), never on the flow-run id (Prefect's DEFAULT policy includes
RUN_ID and so never hits across runs). MLflow's ``parent_run_id`` is excluded from the key: it
differs per run but does not change what a step computes. Results are persisted so a UI Retry of
a failed flow run reuses finished steps.

Steps run in SERIALIZABLE transactions whose locks are leases (``quantdag.locks``): two runs that
reach the same step with the same key compute it once, and a holder killed with ``kill -9`` frees
the step when its lease expires. A step that takes a ``device`` argument loads a model, so it
also holds one slot of each visible GPU's global concurrency limit while it runs.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from quantdag.locks import LeaseLockManager, gpu_slots

CACHE_POLICY = ((INPUTS - "parent_run_id") + TASK_SOURCE).configure(
    lock_manager=LeaseLockManager(), isolation_level="SERIALIZABLE")

_TRANSIENT_MARKERS = ("429", "500", "502", "503", "504", "SlowDown", "Throttl", "timed out", "Connection reset")


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry Hub/S3 5xx, throttling and connection resets only.

    An out-of-memory error, a bad config or a data error never retries (it would fail again).
    """
    try:
        state.result()
    except (ValueError, TypeError, KeyError, MemoryError, RuntimeError):
        return False
    except Exception as err:  # noqa: BLE001 - classify by message: HTTP and botocore errors vary
        text = f"{type(err).__name__}: {err}"
        return isinstance(err, (ConnectionError, TimeoutError)) or any(m in text for m in _TRANSIENT_MARKERS)
    return False


def quantdag_task(name: str, *, retries: int = 0, **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with quantdag's cache policy and persisted results.

    Args:
        name: task name shown in the Prefect UI (the step's name, e.g. ``calibrate_text``).
        retries: retries for transient failures (see :func:`retry_transient`); set
            ``QUANTDAG_TASK_RETRIES=0`` to disable them (tests do).
    """
    retries = int(os.environ.get("QUANTDAG_TASK_RETRIES", retries))
    decorate = task(
        name=name,
        cache_policy=CACHE_POLICY,
        persist_result=True,
        retries=retries,
        retry_delay_seconds=[10, 60, 300][:retries] or 0,
        retry_condition_fn=retry_transient if retries else None,
        **kwargs,
    )
    return lambda fn: decorate(_on_gpu(fn) if "device" in inspect.signature(fn).parameters else fn)


def _on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run while holding this process's GPU slots (see :func:`quantdag.locks.gpu_slots`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.context import TaskRunContext

        context = TaskRunContext.get()
        with gpu_slots(str(context.task_run.id) if context else None):
            return fn(*args, **kwargs)

    return wrapper
