"""Quantizer state: what a calibration step writes and what export reads back.

A state file (``quantizer_state.pt``, written with ``torch.save``) holds:

- ``modelopt_state``: ``modelopt.torch.opt.modelopt_state(model)`` — the quantizer layout and
  config, enough for ``restore_from_modelopt_state`` on a freshly loaded BF16 model;
- ``amax``: ``{quantizer name: float32 tensor}`` for every quantizer holding an ``_amax`` buffer
  (weight quantizers: per-tensor max |w|; input quantizers: calibrated activation max);
- ``input_quantizers``: names of the ENABLED input quantizers that need a calibrated amax (those
  with a constant amax, such as the fp8_cast K/V quantizers, are left out);
- ``global_amax`` (only when the model has static-block NVFP4 weight quantizers, the result of a
  weight-scale search): ``{quantizer name: float32 scalar}``, the per-tensor amax that the
  searched per-block amax are relative to. ``restore_from_modelopt_state`` leaves it
  uninitialised, so it travels with the state.

``restore_from_modelopt_state`` creates no amax buffers (ModelOpt 0.47): :func:`apply_state` sets
them afterwards. The max calibrator keeps its running max in Python, so cross-process merging is
done on these files (``tasks/merge.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "quantizer_state.pt"


def _quantizers(model: torch.nn.Module) -> dict[str, Any]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module for name, module in model.named_modules() if isinstance(module, TensorQuantizer)}


def collect_state(model: torch.nn.Module) -> dict[str, Any]:
    """Read the quantizer state of a calibrated model (tensors copied to CPU float32).

    Args:
        model: a model after ``mtq.quantize(model, config, forward_loop)``.

    Returns:
        ``{"modelopt_state", "amax", "input_quantizers"}`` as described in the module docstring.
    """
    import modelopt.torch.opt as mto

    amax: dict[str, torch.Tensor] = {}
    global_amax: dict[str, torch.Tensor] = {}
    inputs: list[str] = []
    for name, quantizer in _quantizers(model).items():
        value = getattr(quantizer, "_amax", None)
        if value is not None:
            amax[name] = value.detach().to("cpu", torch.float32).clone()
        value = getattr(quantizer, "_global_amax", None)
        if value is not None:
            global_amax[name] = value.detach().to("cpu", torch.float32).clone()
        if (
            name.endswith("input_quantizer")
            and quantizer.is_enabled
            and not getattr(quantizer, "_use_constant_amax", False)
            and getattr(quantizer, "_constant_amax", None) is None
        ):
            inputs.append(name)
    state = {"modelopt_state": mto.modelopt_state(model), "amax": amax, "input_quantizers": sorted(inputs)}
    return {**state, "global_amax": global_amax} if global_amax else state


def bad_input_amax(state: dict[str, Any]) -> dict[str, str]:
    """Enabled input quantizers whose amax is missing, NaN, inf or <= 0, with the reason.

    A quantizer that never saw data ends with amax NaN (ModelOpt's max calibrator, non-strict) or
    no amax at all; one that saw only zeros ends with 0. Either would export an ``input_scale`` of
    0 or NaN and silently break inference.
    """
    bad: dict[str, str] = {}
    for name in state["input_quantizers"]:
        value = state["amax"].get(name)
        if value is None:
            bad[name] = "no amax (the forward loop never reached this module)"
        elif not torch.isfinite(value).all():
            bad[name] = f"amax {value.flatten()[:4].tolist()} is not finite (module never saw data)"
        elif (value <= 0).any():
            bad[name] = "amax 0 (the module only saw zeros)"
    return bad


def require_valid_inputs(state: dict[str, Any], where: str) -> None:
    """Raise if any enabled input quantizer lacks a usable amax; names every one of them.

    Raises:
        ValueError: listing ``module: reason`` for each offender, before any export starts.
    """
    bad = bad_input_amax(state)
    if bad:
        lines = "\n".join(f"  {name.removesuffix('.input_quantizer')}: {why}" for name, why in sorted(bad.items()))
        raise ValueError(
            f"{where}: {len(bad)} enabled input quantizer(s) have no usable amax:\n{lines}\n"
            "Calibrate with data that reaches these modules, or add them to recipe.exclude_modules."
        )


def save_state(state: dict[str, Any], directory: Path) -> Path:
    """Write ``state`` to ``directory/quantizer_state.pt``; returns the file path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    torch.save(state, path)
    return path


def load_state(path: Path) -> dict[str, Any]:
    """Read a state file written by :func:`save_state`.

    Raises:
        ValueError: the file lacks one of the expected keys.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"modelopt_state", "amax", "input_quantizers"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a quantizer state file: missing {sorted(missing)}")
    return state


def apply_state(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """Restore quantizers on a freshly loaded BF16 ``model`` and load every amax.

    Raises:
        ValueError: a quantizer named in the state does not exist in the restored model.
    """
    import modelopt.torch.opt as mto

    return load_amax(mto.restore_from_modelopt_state(model, state["modelopt_state"]), state)


def load_amax(model: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    """Set every quantizer's amax of an already quantized ``model`` to the state's (e.g. merged) values.

    The model's quantizers must be the state's: a model calibrated in this process with the same
    recipe, or one :func:`apply_state` restored. Each amax goes to the device of the model's first
    parameter, in the state's dtype (float32).

    Raises:
        ValueError: a quantizer named in the state does not exist in the model.
    """
    quantizers = _quantizers(model)
    unknown = sorted((set(state["amax"]) | set(state.get("global_amax", {}))) - set(quantizers))
    if unknown:
        raise ValueError(f"quantizer state names {len(unknown)} quantizers absent from the model: {unknown[:5]}")
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for name, value in state["amax"].items():
        quantizers[name].amax = value.to(device)
    for name, value in state.get("global_amax", {}).items():
        quantizers[name].global_amax = value.to(device)
    return model


def amax_summary(state: dict[str, Any]) -> dict[str, float]:
    """Statistics of the input amax (float): count, min, median, max; for MLflow metrics."""
    values = sorted(float(state["amax"][n].max()) for n in state["input_quantizers"] if n in state["amax"])
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"input_quantizers": float(len(values))}
    return {
        "input_quantizers": float(len(values)),
        "input_amax_min": finite[0],
        "input_amax_median": finite[len(finite) // 2],
        "input_amax_max": finite[-1],
    }
