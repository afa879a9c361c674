"""Calibrate one loaded model more than once, each time from a clean slate.

Calibration branches (``image_text``, ``text``) need the same BF16 base with the same
quantizers. Loading it once and calibrating the branches one after the other reads and holds the
weights (54 GB for Qwen3.6-27B) once, and each branch still gets the state it would get on a
model of its own:

- the first branch runs ``mtq.quantize`` (quantizer insertion + max calibration);
- every later branch starts from a clean slate (:func:`reset_calibration`) and runs ModelOpt's
  max-calibration entrypoint (:func:`recalibrate`).
"""

from __future__ import annotations

from typing import Any

import torch

from quantdag.calibration.fast_max import ForwardLoop


def reset_calibration(model: torch.nn.Module) -> int:
    """Put every quantizer back where ``mtq.quantize`` left it before calibrating; returns how many.

    Deletes ``_amax`` and the calibrator's running max of each quantizer that max calibration
    fills (enabled, with a calibrator, not a constant amax) and clears every quantizer's
    recorded input dtype, which a fresh model has as None until a forward sets it.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    count = 0
    for module in model.modules():
        if not isinstance(module, TensorQuantizer):
            continue
        module._input_dtype = None
        constant = module._use_constant_amax or module._constant_amax is not None
        if not module._disabled and not constant and module._calibrator is not None:
            module.reset_amax()
            count += 1
    return count


def recalibrate(model: torch.nn.Module, algorithm: Any, loop: ForwardLoop) -> torch.nn.Module:
    """Run ModelOpt's calibration entrypoint for ``algorithm`` on an already quantized model.

    The same ``convert`` that ``mtq.calibrate`` applies (the ``max_calibrate`` mode's for
    ``"max"``), without recording a second calibration mode in the model's ModelOpt state (so the
    state matches a model calibrated once). Call :func:`reset_calibration` first for amax of
    ``loop``'s rows alone.

    Args:
        model: a model ``mtq.quantize`` returned.
        algorithm: the quantization config's ``algorithm`` entry (``"max"`` or a dict).
        loop: the forward loop to calibrate on.

    Returns:
        ``model``, calibrated in place.
    """
    from modelopt.torch.quantization.mode import CalibrateModeRegistry, get_modelike_from_algo_cfg

    ((mode_name, algo_cfg),) = get_modelike_from_algo_cfg(algorithm)
    descriptor = CalibrateModeRegistry[mode_name]
    model.eval()
    descriptor.convert(model, descriptor.config_class(**algo_cfg), forward_loop=loop)
    return model
