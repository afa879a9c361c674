"""Where a model step puts the model: one device when it fits the memory budget, else spread.

A step that loads a model asks :func:`plan_placement` first. The plan is made on a skeleton of
the model on PyTorch's ``meta`` device (no weights read, no memory taken), sized with
accelerate's ``compute_module_sizes`` in the dtype the step loads (BF16: 2 bytes a parameter):

- the weights fit ``budget - reserve`` of the device the step holds -> the whole model on that
  device, exactly as an unbudgeted load (``device_map={"": <device>}``);
- they do not -> accelerate's ``infer_auto_device_map`` spreads whole decoder layers (the
  model's ``_no_split_modules``) over the first ``gpus`` visible GPUs from the held one, then host
  RAM, then disk, each GPU given ``budget - reserve`` bytes. Layers off the GPU stay in host RAM
  (or a memory-mapped offload folder) and accelerate's hooks bring each to the GPU for its forward,
  as NVIDIA's ``hf_ptq.py`` and the public Qwen3.6-27B NVFP4 release (two 32 GB GPUs) place it.

On the CPU (``device: cpu``) the budget bounds host RAM and the rest goes to disk, which is how
the placement path is tested on machines without a GPU. The reserve (``reserve_fraction`` of the
budget) is what the step needs beside the weights: activations of one calibration batch, the
calibration statistics and the CUDA caching allocator's slack. :func:`memory_budget` makes the
budget binding on each GPU the step uses (``torch.cuda.set_per_process_memory_fraction``): a
step that would exceed it fails with CUDA's out-of-memory error instead of taking more.

Max calibration gives the same amax wherever the layers sit: each amax is a max over the same
values, and max is exact in any order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from conf.schema import PlacementSpec
from quantdag.model.loading import BaseRef

GIB = 1 << 30
"""Bytes in a GiB: budgets are given in GiB (2**30 bytes), as ``nvidia-smi`` reports memory."""

_DISK = 1 << 50  # "unbounded": accelerate needs a number for the last tier


@dataclass(frozen=True)
class Placement:
    """Where one step puts the model's weights.

    Attributes:
        device: the execution device: inputs go here, and the layers of a spread model return here.
        device_map: module name -> GPU ordinal (int), ``"cpu"`` or ``"disk"``; ``{"": device}`` when
            the whole model fits on ``device``.
        weight_bytes: bytes of the weights in the loaded dtype (``compute_module_sizes``).
        budget_bytes: bytes the step may use on each device it computes on, or None (no budget).
        gpus: the GPU ordinals the step uses (empty on the CPU).
    """

    device: torch.device
    device_map: dict[str, Any]
    weight_bytes: int
    budget_bytes: int | None = None
    gpus: tuple[int, ...] = field(default_factory=tuple)

    @property
    def whole(self) -> bool:
        """True when the whole model sits on :attr:`device` (no hooks, no offload)."""
        return list(self.device_map) == [""] and self.device_map[""] in (str(self.device), self.device.index)

    @property
    def offload_tiers(self) -> dict[str, int]:
        """Module count per tier off the execution device's kind (``cpu``, ``disk``) of a spread model."""
        counts: dict[str, int] = {}
        for where in self.device_map.values():
            if where in ("cpu", "disk") and not (where == "cpu" and self.device.type == "cpu"):
                counts[str(where)] = counts.get(str(where), 0) + 1
        return counts

    def describe(self) -> str:
        """One line for logs and MLflow, e.g. ``cuda:0 whole (51.2 GiB of weights, no budget)``."""
        budget = f"budget {self.budget_bytes / GIB:.3g} GiB" if self.budget_bytes else "no budget"
        weights = f"{self.weight_bytes / GIB:.2f} GiB of weights"
        if self.whole:
            return f"{self.device} whole ({weights}, {budget})"
        spread: dict[str, int] = {}
        for where in self.device_map.values():
            key = f"cuda:{where}" if isinstance(where, int) else str(where)
            spread[key] = spread.get(key, 0) + 1
        parts = ", ".join(f"{key}: {count} modules" for key, count in spread.items())
        return f"spread from {self.device} ({parts}; {weights}, {budget})"

    def load_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments that place the model this way (``device_map``)."""
        if self.whole and self.device.type == "cpu":
            return {}  # loaded on the CPU as without a budget: no accelerate hooks
        if self.whole:
            return {"device_map": {"": self.device.index or 0}}
        return {"device_map": dict(self.device_map)}


def model_skeleton(base: BaseRef, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The base's transformers model on the ``meta`` device: every module and shape, no storage.

    Built from ``config.json`` (or the GGUF file's header) with accelerate's
    ``init_empty_weights``; the class is the one :func:`quantdag.model.loading.load_model` loads.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = {"gguf_file": base.gguf_file} if base.gguf_file else {}
    config = AutoConfig.from_pretrained(base.source_dir, **kwargs)
    loader = AutoModelForImageTextToText if base.is_vlm else AutoModelForCausalLM
    with init_empty_weights():
        return loader.from_config(config, dtype=dtype)


def _no_split(model: torch.nn.Module) -> list[str]:
    return sorted(getattr(model, "_no_split_modules", None) or [])


def _device_total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def plan_placement(base: BaseRef, device: torch.device, spec: PlacementSpec,
                   dtype: torch.dtype = torch.bfloat16, skeleton: torch.nn.Module | None = None) -> Placement:
    """Plan where a step loading ``base`` in ``dtype`` on ``device`` puts the weights.

    Args:
        base: the resolved base.
        device: the device the step holds (``cuda:<i>`` of its GPU slot, or ``cpu``).
        spec: the profile's placement: ``memory_budget_gib`` per device (None: a GPU's whole memory;
            on the CPU: no limit), ``reserve_fraction`` of it kept free of weights, ``gpus`` to spread over.
        dtype: the dtype the weights are loaded in (sizes follow it).
        skeleton: the model on ``meta`` (built with :func:`model_skeleton` when omitted).

    Returns:
        The :class:`Placement`; ``device_map == {"": device}`` when the weights fit.

    Raises:
        ValueError: ``spec.gpus`` asks for more GPUs than are visible from ``device``'s ordinal on.
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = skeleton if skeleton is not None else model_skeleton(base, dtype)
    weight_bytes = int(compute_module_sizes(model, dtype=dtype)[""])
    if spec.memory_budget_gib is None and device.type == "cpu":
        return Placement(device=device, device_map={"": str(device)}, weight_bytes=weight_bytes)
    budget = int(spec.memory_budget_gib * GIB) if spec.memory_budget_gib else _device_total_bytes(device)
    room = int(budget * (1.0 - spec.reserve_fraction))
    if device.type == "cpu":
        gpus: tuple[int, ...] = ()
        max_memory: dict[Any, int] = {"cpu": room, "disk": _DISK}
    else:
        first = device.index if device.index is not None else torch.cuda.current_device()
        visible = torch.cuda.device_count()
        if first + spec.gpus > visible:
            raise ValueError(
                f"placement.gpus={spec.gpus} from cuda:{first} needs {first + spec.gpus} visible GPUs, "
                f"{visible} are visible; lower placement.gpus or widen CUDA_VISIBLE_DEVICES")
        gpus = tuple(range(first, first + spec.gpus))
        host = _device_total_bytes(torch.device("cpu"))
        max_memory = {i: room for i in gpus} | {"cpu": int(host * 0.8), "disk": _DISK}
    key = str(device) if device.type == "cpu" else (device.index if device.index is not None else gpus[0])
    if weight_bytes <= room:
        return Placement(device=device, device_map={"": key}, weight_bytes=weight_bytes,
                         budget_bytes=budget, gpus=gpus[:1])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=_no_split(model),
                                       dtype=dtype)
    used = tuple(sorted({where for where in device_map.values() if isinstance(where, int)}))
    return Placement(device=device, device_map=dict(device_map), weight_bytes=weight_bytes, budget_bytes=budget,
                     gpus=used or gpus[:1])


@contextmanager
def memory_budget(placement: Placement) -> Iterator[None]:
    """Make ``placement.budget_bytes`` binding on each GPU it uses for the body of the ``with``.

    Uses ``torch.cuda.set_per_process_memory_fraction`` (the caching allocator refuses more: the
    step fails with ``torch.OutOfMemoryError`` instead of exceeding the budget) and restores the
    full fraction afterwards. Does nothing on the CPU or without a budget.
    """
    limited = [i for i in placement.gpus if placement.budget_bytes] if torch.cuda.is_available() else []
    for ordinal in limited:
        total = torch.cuda.get_device_properties(ordinal).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, placement.budget_bytes / total), ordinal)
    try:
        yield
    finally:
        for ordinal in limited:
            torch.cuda.set_per_process_memory_fraction(1.0, ordinal)


def placement_record(placement: Placement) -> dict[str, Any]:
    """JSON-ready summary for a step's ``meta``: description, bytes, tiers (no module names)."""
    return {"placement": placement.describe(), "weight_bytes": placement.weight_bytes,
            "budget_bytes": placement.budget_bytes, "offloaded_modules": json.dumps(placement.offload_tiers)}
