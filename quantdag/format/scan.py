"""Find weights that hold NaN or infinite values, by tensor name, before any calibration runs.

A base whose weights hold a NaN or an infinity loads fine and then fails deep inside ModelOpt's
calibration (``AssertionError: detected nan values in amax``) after minutes or hours, naming no
module. :func:`nonfinite_tensors` reads the base's safetensors files one tensor at a time through
:class:`~quantdag.format.checkpoint.Checkpoint` (memory for one tensor, no model), so it runs
before the first model load; :func:`find_nonfinite_weights` does the same over a loaded model's
parameters (a GGUF base, which has no safetensors).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from quantdag.format.checkpoint import Checkpoint

FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""safetensors dtype tags of floating-point tensors (the ones that can hold NaN or inf)."""
_CHUNK_ELEMENTS = 1 << 26  # 64 Mi elements: bounds the temporary mask to 64 MiB


def has_nonfinite(tensor: torch.Tensor) -> bool:
    """True when a floating-point tensor holds a NaN or an infinity (checked in chunks of 64 Mi elements)."""
    if not tensor.is_floating_point():
        return False
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        chunk = flat[start:start + _CHUNK_ELEMENTS]
        if chunk.element_size() == 1:  # float8: isfinite has no kernel for it on every device
            chunk = chunk.to(torch.float32)
        if not bool(torch.isfinite(chunk).all()):
            return True
    return False


def nonfinite_tensors(checkpoint_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the floating-point tensors of a safetensors checkpoint that hold a NaN or an infinity.

    Args:
        checkpoint_dir: a directory with ``model.safetensors`` or ``model.safetensors.index.json``
            and its shards.

    Returns:
        Tensor names in checkpoint order (file, then name); empty when every value is finite.
        Reads every floating-point tensor once, one at a time.

    Raises:
        CheckpointFileError: (a ``ValueError``) a file is missing or malformed; names it.
    """
    checkpoint = Checkpoint(checkpoint_dir)
    names = [name for name, info in checkpoint.tensors.items() if info.dtype in FLOAT_TAGS]
    return [name for name, tensor in checkpoint.read(names) if has_nonfinite(tensor)]


def find_nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of a loaded model's parameters that hold a NaN or an infinity.

    Parameters on the ``meta`` device (offloaded by accelerate, or not materialised) are skipped:
    scan their files with :func:`nonfinite_tensors` instead.
    """
    return [name for name, param in model.named_parameters() if not param.is_meta and has_nonfinite(param.detach())]


def describe_nonfinite(label: str, names: Iterable[str], scanned: int) -> str:
    """One line naming the non-finite tensors of ``label`` (up to 10) and the fix."""
    names = list(names)
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return (f"{label}: {len(names)} of {scanned} floating-point tensors hold NaN or infinite values: {shown}; "
            "the weights are damaged: download the base again or repair those tensors before quantizing")


def require_finite(checkpoint_dir: str | os.PathLike[str], label: str) -> int:
    """Scan a checkpoint with :func:`nonfinite_tensors`; returns the number of tensors scanned.

    Args:
        checkpoint_dir: the checkpoint directory.
        label: how the error names the checkpoint (``base Qwen/Qwen3.6-27B@<sha>``).

    Raises:
        ValueError: a tensor holds NaN or inf; one line naming every such tensor (up to 10) and
            the fix. ``CheckpointFileError`` (a ``ValueError``) for a missing or malformed file.
    """
    checkpoint = Checkpoint(checkpoint_dir)
    scanned = sum(info.dtype in FLOAT_TAGS for info in checkpoint.tensors.values())
    bad = nonfinite_tensors(checkpoint_dir)
    if bad:
        raise ValueError(describe_nonfinite(label, bad, scanned))
    return scanned
