"""Preload step: load the BF16 base in a calibration worker process before its rows are fetched.

With ``calibration_gpus: N`` the flow calibrates one group of shards in its own process (on the
model the BF16 reference left there) and each other group in a worker process pinned to one GPU
(``quantdag.runtime.gpu_pool``). A worker's process start, imports and model load (about 35 s
for a 4-layer 27B-width slice, more at 64 layers) would otherwise stand between fetch and its
calibration; this step runs them while fetch and the reference run, and leaves the model in the
process (:mod:`quantdag.model.warm`, note ``preload_seconds``), where the worker's ``calibrate``
call takes it and counts the load as its own (``model_loads`` 1, ``preloaded`` 1).

It holds the worker's GPU slot only while loading, like every model step. It is never cached: its
result is a model in a process's memory, which a later run cannot reuse.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import PlacementSpec
from quantdag.model import warm
from quantdag.model.loading import BaseRef
from quantdag.runtime import devices
from quantdag.runtime.locks import gpu_slots
from tasks.calibrate import PRELOAD_NOTE


def preload_base(base: BaseRef, device: str, placement: PlacementSpec = PlacementSpec()) -> dict[str, Any]:
    """Load ``base`` as calibration will want it and keep it in this process.

    Args:
        base: the resolved base.
        device: ``auto``, ``cpu`` or ``cuda`` (the GPU is the one whose slot the caller holds).
        placement: the profile's placement (the kept model's key includes it).

    Returns:
        ``{"load_seconds": float, "loaded": bool, "device": str}``; ``loaded`` is False when this
        process already held the model (nothing was read).
    """
    torch_device = devices.pick_device(device)
    held = warm.base_model(base, torch_device, placement)
    note = dict(held.note)
    if held.loaded:
        note[PRELOAD_NOTE] = held.load_seconds
    warm.keep(held.key, held.model, held.stage, **note)
    return {"load_seconds": held.load_seconds, "loaded": held.loaded, "device": str(torch_device)}


@task(name="preload_base", cache_policy=NO_CACHE, persist_result=False)
def preload_base_task(base: BaseRef, device: str, placement: PlacementSpec = PlacementSpec()) -> dict[str, Any]:
    """Prefect wrapper of :func:`preload_base`, on one held GPU slot (the worker's own GPU)."""
    import torch

    with gpu_slots() as slot:
        if slot is not None and torch.cuda.is_available():
            torch.cuda.set_device(slot.ordinal)
        return preload_base(base, device, placement)
