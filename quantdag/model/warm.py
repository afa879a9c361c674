"""One model kept in memory between the model steps of one process, so a run loads the base once.

The BF16 reference, calibration and export all start from the same BF16 base placed the same
way. The first of them that runs loads it; when it ends it leaves the model here with a note of
what was done to it (``"bf16"``: untouched; ``"quantized"``: ModelOpt's quantizers inserted and
calibrated); the next step takes it instead of loading again. Export mutates the model (packed
weights), so it never leaves it back. At most one model is kept per process: taking a model under
another key, or :func:`release`, drops the kept one first, so two full copies never coexist.

Only model steps touch this slot, and they run one at a time per process (the model lock of
:mod:`quantdag.runtime.prefect_task`); worker processes of a GPU pool each have their own.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WarmKey:
    """What a kept model is: which base, placed how, in which dtype.

    Attributes:
        base: the base's identity (``BaseRef.fingerprint``).
        placement: ``Placement.describe()`` of the load.
        dtype: the weights' dtype name (``bfloat16``).
    """

    base: str
    placement: str
    dtype: str


@dataclass
class _Kept:
    key: WarmKey
    model: torch.nn.Module
    stage: str
    note: dict[str, Any]


_slot: list[_Kept] = []


def keep(key: WarmKey, model: torch.nn.Module, stage: str, **note: Any) -> None:
    """Leave ``model`` for the next step of this process; ``stage`` says what was done to it.

    Args:
        key: what the model is.
        model: the model (not copied).
        stage: ``"bf16"`` (as loaded) or ``"quantized"`` (quantizers inserted and calibrated).
        note: anything the next step needs to know (e.g. the recipe the quantizers follow).
    """
    release()
    _slot.append(_Kept(key, model, stage, dict(note)))


def take(key: WarmKey) -> tuple[torch.nn.Module, str, dict[str, Any]] | None:
    """The kept model if it is ``key`` (removed from the slot: the caller owns it), else None.

    A kept model under another key is released first, so the caller's own load has the memory.
    """
    if not _slot:
        return None
    kept = _slot.pop()
    if kept.key == key:
        return kept.model, kept.stage, kept.note
    del kept
    _free()
    return None


def kept_key() -> WarmKey | None:
    """The key of the kept model, or None."""
    return _slot[0].key if _slot else None


def release() -> bool:
    """Drop the kept model (if any) and give its memory back; returns whether one was kept."""
    if not _slot:
        return False
    _slot.clear()
    _free()
    return True


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _round_to_bf16(model: torch.nn.Module) -> None:
    """Round float32 weights to BF16 values in place (still float32): the model is the BF16 model.

    A no-op for a BF16 checkpoint (its values are BF16 already); a float32 source (a GGUF file
    dequantized by transformers) gets the weights a BF16 load would hold, so calibration, export
    and the reference see the same numbers on the CPU as on a GPU. Weights offloaded to disk are
    read as stored.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype == torch.float32 and param.device.type != "meta":
                param.copy_(param.to(torch.bfloat16))


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype model steps compute in: BF16 on a GPU; float32 on the CPU.

    CPUs have no fast BF16 matmul: there the BF16 weights are upcast (exactly) and activations run
    in float32, so calibration amax and reference log-probabilities carry no BF16 rounding of the
    activations; the weights hold BF16 values either way.
    """
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class BaseModel:
    """The base model a step works on, and how it got it.

    Attributes:
        model: the transformers model (eval mode), placed by :attr:`placement`.
        stage: ``"bf16"`` (weights as loaded) or ``"quantized"`` (ModelOpt quantizers inserted).
        note: what the previous step recorded with :func:`keep`.
        placement: where the weights are.
        key: the model's :class:`WarmKey` (give it back with :func:`keep`).
        load_seconds: seconds this step spent loading (0.0 when it took a kept model).
        loaded: True when this step read the model from files.
    """

    model: torch.nn.Module
    stage: str
    note: dict[str, Any]
    placement: Any
    key: WarmKey
    load_seconds: float
    loaded: bool


def base_model(base: Any, device: torch.device, spec: Any, offload_dir: Any = None) -> BaseModel:
    """The base on ``device`` in :func:`compute_dtype`, placed by ``spec``: the kept one, else loaded.

    Args:
        base: the resolved base (``BaseRef``).
        device: the device the step holds.
        spec: the profile's ``PlacementSpec``.
        offload_dir: directory for weights placed on ``disk`` (a temporary one when None).

    Returns:
        A :class:`BaseModel`; ``loaded`` tells whether this call read the files.
    """
    from quantdag.model.loading import load_model
    from quantdag.model.placement import plan_placement

    dtype = compute_dtype(device)
    placement = plan_placement(base, device, spec, dtype=dtype)
    key = WarmKey(base=base.fingerprint, placement=placement.describe(), dtype=str(dtype).removeprefix("torch."))
    kept = take(key)
    if kept is not None:
        model, stage, note = kept
        return BaseModel(model, stage, note, placement, key, 0.0, loaded=False)
    loaded = load_model(base, device, dtype=dtype, placement=placement, offload_dir=offload_dir)
    if dtype != torch.bfloat16:
        _round_to_bf16(loaded.model)
    return BaseModel(loaded.model, "bf16", {}, placement, key, loaded.load_seconds, loaded=True)
