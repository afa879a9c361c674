"""Shared Prefect settings for quantdag's tasks: cache policy, persistence, retries.

Every step is cached across flow runs on its inputs plus its source plus the code version
(``quantdag.runtime.version.code_version``), never on the flow-run id (Prefect's DEFAULT policy includes
RUN_ID and so never hits across runs). MLflow's ``parent_run_id`` and the ``placement`` of a model
step (where its weights sit: one GPU, several, host RAM) are excluded from the key: they differ per
run or per host but do not change what a step computes. Results are persisted so a UI Retry of
a failed flow run reuses finished steps.

A cache hit is only handed on when what it points to is intact (:class:`VerifiedHits`): before
the record of a key is used, every :class:`~quantdag.runtime.store.ArtifactRef` in it is checked
against its manifest (:meth:`~quantdag.runtime.store.ArtifactStore.check`: sizes, stat
signatures, sha256 of small or changed files). A damaged artifact turns the hit into a recompute
under a key derived from the damaged one; the step's ``put_dir`` then replaces the damaged copy, so
the original key hits again on the next run. Steps whose inputs name something outside the store
(a local or S3 mirror, a Hub dataset) add a content key (``quantdag_task(..., content_key=...)``):
what the files hold, not where they are.

Every process that imports this module masks secrets in its log records
(:func:`quantdag.runtime.secrets.install_log_redaction`).

Steps run in SERIALIZABLE transactions whose locks are leases (``quantdag.runtime.locks``): two runs that
reach the same step with the same key compute it once, and a holder killed with ``kill -9`` frees
the step when its lease expires.

A step that loads a model says so (``quantdag_task(name, model_step=True)``);
:func:`_on_gpu` wraps it and, in order:

1. takes the process-wide model lock (a ``threading.Lock``): one model step at a time per
   process. ModelOpt's KV-cache quantization swaps transformers' module-global attention
   function during each quantized forward, so two model steps in threads of one process
   (``ThreadPoolTaskRunner``) must never overlap; steps that should run side by side on several
   GPUs run in separate worker processes (``ProcessPoolTaskRunner``). The lock comes first so
   that a thread waiting for it holds no GPU slot that another process could use.
2. holds ONE free GPU among the visible ones (:func:`quantdag.runtime.locks.gpu_slots`: the slot of
   its ``gpu-<i>`` global concurrency limit; waits while every visible GPU is taken) and, when
   CUDA is available, makes it torch's current device (``torch.cuda.set_device``), so that
   ``quantdag.runtime.devices.pick_device`` (``cuda:<ordinal>``) and libraries that use the current
   device put the model on it.
3. after the step body, also when it fails: drops the local variables of the failed call's
   frames (a traceback would keep the model alive), runs ``gc.collect()`` and, when CUDA is
   available, ``torch.cuda.empty_cache()``, before it gives back the GPU slot and the lock,
   so the next step in this process or on this GPU gets the GPU memory back.
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from conf.settings import settings
from quantdag.runtime.locks import GpuSlot, LeaseLockManager, gpu_slots
from quantdag.runtime.secrets import install_log_redaction
from quantdag.runtime.store import ArtifactRef, ArtifactStore

log = logging.getLogger(__name__)
install_log_redaction()

_MAX_REPAIR_KEYS = 4
"""Damaged records followed from one key before the step recomputes under the last key tried."""


@dataclass
class VerifiedHits(CachePolicy):
    """Prefect cache policy: ``policy``'s key, unless the record under it points to damaged artifacts.

    Prefect would hand on any record stored under a step's key. This policy first reads that
    record (a few hundred bytes: tasks return references) and checks every
    :class:`~quantdag.runtime.store.ArtifactRef` in its value with
    :meth:`~quantdag.runtime.store.ArtifactStore.check`. When one differs from its manifest, the
    key becomes ``hash(key, damaged shas)``: a key of its own for this damage, under which the step
    recomputes (or, on a later run, hits the recomputed result). Each decision is logged on the
    task run.

    Attributes:
        policy: the policy that computes the key (inputs, source, ...).
    """

    policy: CachePolicy | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        """The key of ``policy`` or, when its record is damaged, the key derived from the damage."""
        key = self.policy.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        if key is None:
            return None
        from prefect.results import get_result_store

        store = get_result_store()
        for _ in range(_MAX_REPAIR_KEYS):
            damaged = damaged_results(_cached_value(store, key))
            if not damaged:
                return key
            _run_logger().warning("cached result of %s points to damaged artifacts, recomputing: %s",
                                  getattr(task_ctx.task, "name", "step"), "; ".join(damaged.values())[:2000])
            key = hash_objects(key, sorted(damaged), raise_on_failure=True)
        return key


@dataclass
class ContentKey(CachePolicy):
    """Prefect cache policy: a key from what a step's inputs hold (``fingerprint(inputs)``), not their names.

    Attributes:
        fingerprint: ``inputs -> str`` (e.g. sizes and mtimes or ETags of a mirror's files, a
            Hub commit sha); None adds nothing to the key.
    """

    fingerprint: Callable[[dict[str, Any]], str | None] | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        """``fingerprint(inputs)``."""
        return self.fingerprint(inputs) if self.fingerprint else None


_KEY = (INPUTS - "parent_run_id" - "placement") + TASK_SOURCE
CACHE_POLICY = VerifiedHits(policy=_KEY).configure(lock_manager=LeaseLockManager(), isolation_level="SERIALIZABLE")


def artifact_refs(value: Any) -> list[ArtifactRef]:
    """Every :class:`ArtifactRef` in a step's return value (itself, or inside dicts, lists, tuples)."""
    if isinstance(value, ArtifactRef):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [ref for item in value for ref in artifact_refs(item)]
    return []


def damaged_results(value: Any) -> dict[str, str]:
    """sha256 -> what is wrong, for each artifact in ``value`` that is missing or differs from its manifest.

    Raises:
        OSError: a store cannot be read (then the key is not computed and Prefect recomputes the
            step without caching it).
    """
    damaged = {}
    for ref in artifact_refs(value):
        try:
            problems = ArtifactStore.for_ref(ref).check(ref)
        except ValueError as err:  # not an object of a store
            problems = [str(err)]
        if problems:
            damaged[ref.sha256] = f"{ref.kind} {ref.sha256[:12]} at {ref.uri}: {', '.join(problems[:5])}"
    return damaged


def _cached_value(store: Any, key: str) -> Any:
    """The value of the record under ``key`` in Prefect's result store; None when there is none."""
    if not store.exists(key):
        return None
    return store.read(key).result


def _run_logger() -> Any:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log

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


def quantdag_task(name: str, *, model_step: bool = False, retries: int = 0,
                  content_key: Callable[[dict[str, Any]], str | None] | None = None,
                  **kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task`` with quantdag's cache policy (verified hits) and persisted results.

    Args:
        name: task name shown in the Prefect UI (the step's name, e.g. ``calibrate_text``).
        model_step: the step loads a model: run it under :func:`_on_gpu` (this process's model
            lock, one held GPU slot, GPU memory freed after; see the module docstring).
        content_key: ``inputs -> str``, added to the cache key (:class:`ContentKey`): what the
            inputs hold where their names do not tell (a mirror's files, a Hub revision). A
            module-level function: worker processes unpickle it by reference.
        retries: retries for transient failures (see :func:`retry_transient`), spaced by
            ``QUANTDAG_RETRY_DELAYS_SECONDS``; ``QUANTDAG_TASK_RETRIES`` replaces it for every
            step (0 disables them; tests do). Both are read when the module defining the step
            is imported.
        kwargs: passed to Prefect's ``@task``.

    Raises:
        SettingsError: a ``QUANTDAG_*`` variable has a bad value (see :mod:`conf.settings`).
    """
    knobs = settings()
    retries = retries if knobs.task_retries is None else knobs.task_retries
    policy = CACHE_POLICY
    if content_key is not None:
        policy = VerifiedHits(policy=_KEY + ContentKey(fingerprint=content_key)).configure(
            lock_manager=CACHE_POLICY.lock_manager, isolation_level="SERIALIZABLE")
    decorate = task(
        name=name,
        cache_policy=policy,
        persist_result=True,
        retries=retries,
        retry_delay_seconds=list(knobs.retry_delays_seconds[:retries]) or 0,
        retry_condition_fn=retry_transient if retries else None,
        **kwargs,
    )
    return lambda fn: decorate(_on_gpu(fn) if model_step else fn)


MODEL_LOCK = threading.Lock()
"""Held by every model step of this process while it runs (see the module docstring)."""


def _on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run under this process's model lock, on one held GPU, freeing its memory after.

    See the module docstring for the order. The returned wrapper waits (no time limit) first for
    :data:`MODEL_LOCK`, then for a free GPU slot.

    Raises:
        RuntimeError: from :func:`quantdag.runtime.locks.gpu_slots` when a visible GPU's concurrency limit
            does not exist (names the ``prefect gcl create`` command); otherwise whatever ``fn``
            raises.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.context import TaskRunContext

        context = TaskRunContext.get()
        outer = sys.exception()
        lock = _model_lock()  # looked up, never captured: worker processes unpickle this wrapper by value
        if not lock.acquire(blocking=False):
            log.info("%s waits for another model step of this process to finish", fn.__name__)
            lock.acquire()
        try:
            with gpu_slots(str(context.task_run.id) if context else None) as slot:
                try:
                    _use_gpu(slot)
                    return fn(*args, **kwargs)
                except BaseException as err:
                    _drop_locals(err, outer)
                    raise
                finally:
                    _free_gpu_memory()
        finally:
            lock.release()

    return wrapper


def _model_lock() -> threading.Lock:
    """This process's :data:`MODEL_LOCK` (each process has its own)."""
    return MODEL_LOCK


def _use_gpu(slot: GpuSlot | None) -> None:
    """Make the held GPU torch's current device in this thread (when CUDA is available)."""
    import torch

    if slot is not None and torch.cuda.is_available():
        torch.cuda.set_device(slot.ordinal)


_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _drop_locals(err: BaseException, outer: BaseException | None) -> None:
    """Clear the local variables of the finished frames in ``err``'s tracebacks and its causes'.

    Line numbers stay, so the traceback still prints; only what the frames referenced (a model,
    its activations) is let go while Prefect keeps the exception in the task's state. Frames
    still running, generator and coroutine frames (clearing a suspended one would close it) and
    ``outer`` (the exception the caller was handling when the step started) are left alone.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or current is outer or id(current) in seen:
            continue
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            if not tb.tb_frame.f_code.co_flags & _SUSPENDABLE:
                try:
                    tb.tb_frame.clear()
                except RuntimeError:  # still running (this wrapper's own frame)
                    pass
            tb = tb.tb_next
        todo += [current.__cause__, current.__context__]


def _free_gpu_memory() -> None:
    """``gc.collect()``, then ``torch.cuda.empty_cache()`` when CUDA is available."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
