"""Where the quantize flow's calibration calls run: this process, one worker per GPU, or a work pool.

``flows.quantize._calibrations`` builds the calls (``tasks.calibration_split.calibration_calls``)
and hands them to one of these, by profile:

- :func:`in_this_process` (``calibration_gpus: 1``): tasks in threads of the flow's process, after
  the BF16 reference, whose loaded model the first call takes.
- :func:`on_gpu_workers` (``calibration_gpus: N``): one call per GPU. The first runs in this
  process on the reference's model (first visible GPU); each other runs in a worker process bound
  to its own GPU (``quantdag.runtime.gpu_pool``). When the reference is being computed (a cold
  run), each worker preloads the base meanwhile (``tasks.preload``), so its calibration starts on
  a loaded model; every call keeps its model for all its shards. The workers end (and free their
  GPUs) before export loads anything.
- :func:`on_work_pool` (``calibration_pool``): one call per shard, each a flow run of the
  ``calibrate-shard`` deployment on any worker of the pool (``tasks.calibrate_remote``).

Each returns the calls' futures in call order; every layout gives the same states, bit for bit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture

from conf.schema import Profile
from quantdag.runtime.gpu_pool import GpuWorker, worker_gpus
from tasks.calibrate import calibrate_task
from tasks.calibrate_remote import calibrate_remote_task
from tasks.preload import preload_base_task

PRELOAD_GRACE_SECONDS = 3.0
"""A reference still running this long is being computed, not read from the cache: preload then."""


def in_this_process(calls: list[dict[str, Any]], reference: PrefectFuture) -> list[PrefectFuture]:
    """Each call as a task of this flow's task runner, after ``reference`` (whose model the first takes)."""
    return [calibrate_task.submit(**call, wait_for=[reference]) for call in calls]


def on_work_pool(calls: list[dict[str, Any]], profile: Profile, scan: PrefectFuture) -> list[PrefectFuture]:
    """Each call as a flow run of ``profile.calibration_pool.deployment``, waited for in a thread of this process."""
    return [calibrate_remote_task.submit(**call, pool=profile.calibration_pool, wait_for=[scan]) for call in calls]


def reference_computes(reference: PrefectFuture, grace: float | None = None, poll: float = 0.5) -> bool:
    """Whether the BF16 reference is being computed (a load is under way) rather than read from the cache.

    A cache hit passes through Running for well under a second; a run still unfinished ``grace``
    seconds (default :data:`PRELOAD_GRACE_SECONDS`) after it started running is computing (or
    waiting for another run's lease on it).
    """
    grace = PRELOAD_GRACE_SECONDS if grace is None else grace
    running_since = None
    while True:
        state = reference.state
        if state.is_final():
            return False
        if state.is_running():
            running_since = running_since or time.monotonic()
            if time.monotonic() - running_since >= grace:
                return True
        time.sleep(poll)


def on_gpu_workers(calls: list[dict[str, Any]], profile: Profile, base: Any, reference: PrefectFuture,
                   scan: PrefectFuture) -> list[PrefectFuture]:
    """The first call in this process, each other in a worker process bound to one GPU; waits for all.

    Raises:
        ValueError: fewer visible GPUs than calls (``quantdag.runtime.gpu_pool.worker_gpus``).
        Whatever a preload raised (it is the worker's model load).
    """
    logger = get_run_logger()
    gpus = worker_gpus(len(calls) - 1) if profile.device != "cpu" else [None] * (len(calls) - 1)
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(GpuWorker(gpu)) for gpu in gpus]
        preloads = []
        if workers and reference_computes(reference):
            logger.info("preloading the base in %d calibration worker(s) (GPUs %s) while the reference runs",
                        len(workers), ", ".join(str(gpu) for gpu in gpus))
            preloads = [worker.submit(preload_base_task, {"base": base, "device": profile.device,
                                                          "placement": profile.placement}, wait_for=[scan])
                        for worker in workers]
        submitted = [calibrate_task.submit(**calls[0], wait_for=[reference])]
        submitted += [worker.submit(calibrate_task, call, wait_for=[preloads[i]] if preloads else [scan])
                      for i, (worker, call) in enumerate(zip(workers, calls[1:]))]
        for future in [*preloads, *submitted]:
            future.wait()
        for preload in preloads:
            preload.result()  # a failed preload fails the flow with its own error
    return submitted
