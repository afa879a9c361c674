"""The torch device a model step computes on: the GPU whose slot the step holds, or the CPU."""

from __future__ import annotations

import torch

from quantdag.runtime.locks import current_gpu


def pick_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` -> CUDA; anything else as given.

    CUDA is ``cuda:<ordinal>`` of the GPU whose slot this task holds
    (:func:`quantdag.runtime.locks.current_gpu`, taken by ``quantdag.runtime.prefect_task``), else plain ``cuda``
    (the current device).

    Raises:
        RuntimeError: ``cuda`` was requested and no CUDA device is visible.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device; set device: cpu or auto")
    if requested in ("auto", "cuda"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        slot = current_gpu()
        return torch.device("cuda", slot.ordinal) if slot is not None else torch.device("cuda")
    return torch.device(requested)
