"""One worker process per GPU for calibration on several GPUs of one host, each bound to its GPU.

``ProcessPoolTaskRunner`` hands every task call the flow process's environment, so a worker of a
plain pool sees every GPU of ``CUDA_VISIBLE_DEVICES`` and takes whichever slot is free: a model it
loaded on one GPU for one task is useless to its next task if that one lands on another GPU.
:class:`GpuWorker` is a one-process pool whose calls see ONE GPU (``CUDA_VISIBLE_DEVICES`` set to
it for every call), so the model a preload left there is the model its calibration takes, and
the worker only ever holds that GPU's Prefect slot (``gpu-<id>``). CUDA reads the variable once,
when the process first uses it, so the process stays on that GPU for its whole life.

:func:`worker_gpus` says which GPUs the workers get: the visible ones after the flow process's
own (the first visible GPU, where the BF16 reference left its model for the first group).
"""

from __future__ import annotations

import os
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner


class GpuWorker(ProcessPoolTaskRunner):
    """A process pool of one worker whose task calls see only ``gpu`` (None: the environment as is).

    Args:
        gpu: a ``CUDA_VISIBLE_DEVICES`` entry (``"1"``, or a GPU UUID); None on a host without
            GPUs (the calls then run on the CPU, as the profile's device says).
    """

    def __init__(self, gpu: str | None) -> None:
        super().__init__(max_workers=1)
        self.gpu = gpu

    def duplicate(self) -> GpuWorker:
        """A new, unstarted worker for the same GPU (Prefect duplicates runners for nested flows)."""
        return type(self)(self.gpu)

    def _resolve_futures_and_submit(self, *args: Any, env: dict[str, str], **kwargs: Any) -> Any:
        """Prefect's submission with this worker's GPU in the call's environment."""
        if self.gpu is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": self.gpu}
        return super()._resolve_futures_and_submit(*args, env=env, **kwargs)


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The entries of ``CUDA_VISIBLE_DEVICES`` (``"0,1"`` -> ``["0", "1"]``; unset, empty or ``-1``: none)."""
    env = os.environ if env is None else env
    return [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip() and d.strip() != "-1"]


def worker_gpus(workers: int, env: dict[str, str] | None = None) -> list[str | None]:
    """The GPU of each of ``workers`` worker processes: the visible GPUs after the first, in order.

    The first visible GPU stays with the flow's own process. Without visible GPUs (a CPU host or
    ``device: cpu``) every worker gets None.

    Raises:
        ValueError: GPUs are visible but fewer than ``workers + 1`` (preflight names the same
            shortfall before any model loads).
    """
    visible = visible_gpus(env)
    if not visible:
        return [None] * workers
    if len(visible) < workers + 1:
        raise ValueError(f"{workers + 1} calibration GPUs wanted but CUDA_VISIBLE_DEVICES holds {len(visible)} "
                         f"({','.join(visible)}): list more GPUs or lower calibration_gpus")
    return list(visible[1:workers + 1])
