"""Max calibration with the amax ModelOpt computes, in fewer kernels and no host synchronisation.

Under ModelOpt 0.47's max calibration every quantized
linear runs ModelOpt's forward on every batch: the weight quantizer re-reads the whole weight
(its amax cannot change), and each enabled quantizer's ``MaxCalibrator`` spends five kernels on
one amax and then checks it for NaN, inf and negatives with three host synchronisations, which
drains the GPU queue about three times per quantizer per batch. While a loop wrapped by
:func:`fast_max_loop` runs, each eligible quantized linear instead computes ``F.linear`` on its
unquantized weight and records its input's ``(min, max)`` with one ``torch.aminmax``, shared
by siblings that read the same tensor (q/k/v, gate/up, in_proj_qkv/z) and never synchronising.
When the loop ends each calibrator receives ``max(|max|, |min|)``: the value ``MaxCalibrator``
accumulates, because max and min are exact in any order. Weight amax come from ModelOpt's own
weight pass, which ``max_calibrate`` runs before the loop; ModelOpt then finishes calibration
as usual. Modules that do not fit (another calibrator, pre-quant scales, rotations, a custom
forward) keep ModelOpt's forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.nn.functional as F

ForwardLoop = Callable[[torch.nn.Module], None]


class _LastInput:
    """``torch.aminmax`` of the last input seen, reused while the same tensor comes back unchanged."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None
        self.version = -1
        self.minmax: tuple[torch.Tensor, torch.Tensor] | None = None

    def minmax_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x is not self.tensor or x._version != self.version:
            data = x.detach()
            if data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                data = data.to(torch.get_default_dtype())  # as ModelOpt's reduce_amax does
            self.tensor, self.version, self.minmax = x, x._version, tuple(torch.aminmax(data))
        return self.minmax


def _passes_through(quantizer: Any) -> bool:
    """A plain TensorQuantizer that returns its input unchanged when it does not quantize."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return (type(quantizer) is TensorQuantizer and quantizer.pre_quant_scale is None
            and not quantizer.rotate_is_enabled and not quantizer.rotate_back_is_enabled)


def _collects_max(quantizer: Any) -> bool:
    """Collecting (not quantizing) into a plain max calibrator, with no reshaping of its input."""
    from modelopt.torch.quantization.calib import MaxCalibrator

    blocks = quantizer.block_sizes
    reshapes = blocks is not None and (quantizer.is_static_block_quant or not any(
        isinstance(k, int) and v is not None for k, v in blocks.items()))
    return (_passes_through(quantizer) and quantizer._if_calib and not quantizer._if_quant
            and not quantizer._dynamic and type(quantizer._calibrator) is MaxCalibrator
            and not quantizer._calibrator._track_amax and quantizer.bias_calibrator is None and not reshapes)


def _eligible(module: torch.nn.Module) -> bool:
    """A ModelOpt quantized ``nn.Linear`` whose calibration forward :func:`_fast_forward` reproduces."""
    from modelopt.torch.quantization.nn.modules.quant_module import QuantLinearConvBase

    if not isinstance(module, QuantLinearConvBase) or not isinstance(module, torch.nn.Linear):
        return False
    if type(module).forward is not QuantLinearConvBase.forward or "_forward_pre_dm" in module.__dict__:
        return False
    if "forward" in module.__dict__:  # an instance forward: a hook (accelerate's offload) must keep running
        return False
    if getattr(module, "original_cls", None) is None or module.original_cls.forward is not torch.nn.Linear.forward:
        return False
    inputs, weights, outputs = module.input_quantizer, module.weight_quantizer, module.output_quantizer
    weight_done = weights._disabled or (_collects_max(weights) and weights._calibrator.compute_amax() is not None)
    return (outputs._disabled and _passes_through(outputs) and _passes_through(weights) and weight_done
            and (inputs._disabled and _passes_through(inputs) or _collects_max(inputs)))


def _fast_forward(module: torch.nn.Module, last: _LastInput, records: list) -> Any:
    """``forward`` for an eligible module: ``F.linear`` plus the (min, max) of its input."""
    original = type(module).forward
    params = module._parameters  # read per call: an offload hook (accelerate) swaps the tensors in and out
    inputs, outputs = module.input_quantizer, module.output_quantizer
    collect = not inputs._disabled

    def forward(x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor:  # DTensor, quantized tensors: ModelOpt's path
            return original(module, x)
        if x.numel():
            if collect:
                records.append(last.minmax_of(x))
            else:
                inputs._input_dtype = x.dtype  # what a disabled quantizer records when called
        out = F.linear(x, params["weight"], params.get("bias"))
        if out.numel():
            outputs._input_dtype = out.dtype
        return out

    return forward


def _finish(records: dict[str, tuple[Any, list]]) -> None:
    """Hand each module's accumulated ``max(|max|, |min|)`` to its input quantizer's calibrator.

    Raises:
        ValueError: a module saw NaN or inf (named), as ModelOpt's calibrator checks would.
    """
    results = {}
    for name, (quantizer, seen) in records.items():
        if not seen:
            continue  # never reached: no amax, exactly as ModelOpt leaves it
        lows, highs = [low for low, _ in seen], [high for _, high in seen]
        if len({t.dtype for t in lows}) == 1:
            low, high = torch.stack(lows).min(), torch.stack(highs).max()
        else:
            low, high = lows[0], highs[0]
            for other_low, other_high in zip(lows[1:], highs[1:]):
                low, high = torch.minimum(low, other_low), torch.maximum(high, other_high)
        results[name] = (quantizer, torch.maximum(torch.abs(high), torch.abs(low)))
    if not results:
        return
    finite = torch.stack([amax.float() for _, amax in results.values()]).isfinite().tolist()
    bad = [name for name, ok in zip(results, finite) if not ok]
    if bad:
        raise ValueError(f"calibration inputs hold NaN or inf at {len(bad)} modules: {bad[:8]}")
    for quantizer, amax in results.values():
        calibrator = quantizer._calibrator
        previous = calibrator._calib_amax
        calibrator._calib_amax = amax if previous is None else torch.max(previous, amax)


@contextmanager
def fast_max_statistics(model: torch.nn.Module) -> Iterator[int]:
    """Inside ModelOpt's max calibration, run eligible linears on the fast path (see module docstring).

    Enter it where ModelOpt calls the forward loop (quantizers collecting); on a clean exit the
    calibrators hold what ModelOpt's own forward would have collected.

    Yields:
        The number of modules on the fast path.
    """
    last = _LastInput()
    records: dict[str, tuple[Any, list]] = {}
    patched = []
    try:
        for name, module in model.named_modules():
            if _eligible(module):
                seen: list = []
                module.forward = _fast_forward(module, last, seen)
                patched.append(module)
                if not module.input_quantizer._disabled:
                    records[name] = (module.input_quantizer, seen)
        yield len(patched)
        _finish(records)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        last.tensor = None


def fast_max_loop(loop: ForwardLoop) -> ForwardLoop:
    """``loop`` run under :func:`fast_max_statistics`; give it to ``mtq.quantize`` / ``mtq.calibrate``."""

    def fast_loop(model: torch.nn.Module) -> None:
        with fast_max_statistics(model):
            loop(model)

    return fast_loop
