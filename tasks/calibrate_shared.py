"""Calibrate several branches on ONE model load, and calibrate faster with the same amax.

Shared load. Both calibration branches (``image_text``, ``text``) need the same BF16 base with
the same quantizers. When they run on the same GPU, :func:`calibrate_branches` loads the base
once and calibrates the branches one after the other, so the weights are read (54 GB for
Qwen3.6-27B) and held on the device once. Each branch still writes its own quantizer state,
equal to what :func:`tasks.calibrate.calibrate` writes for it in a process of its own:

- the first branch runs ``mtq.quantize`` (quantizer insertion + max calibration), as
  :func:`tasks.calibrate.calibrate` does;
- every later branch starts from a clean slate (:func:`reset_calibration`: each calibrated
  quantizer's ``_amax`` buffer is deleted, its max calibrator forgets its running max, and the
  input dtype the forward recorded is cleared) and runs ModelOpt's max-calibration entrypoint
  (the ``max_calibrate`` mode's ``convert``: what ``mtq.calibrate`` runs, without appending a
  second calibration mode to the model's ModelOpt state).

Fast statistics (:func:`fast_max_loop`). Under ModelOpt 0.47's max calibration every quantized
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

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from conf.schema import ImageTextSource, RecipeSpec, TextSource
from quantdag import modeling
from quantdag.modeling import BaseRef
from quantdag.quantizer_state import amax_summary, collect_state, require_valid_inputs, save_state
from quantdag.recipe import build_quant_config
from quantdag.store import ArtifactRef, ArtifactStore
from tasks.calibrate import CALIBRATORS, STATE_KIND, ForwardLoop, check_vision
from tasks.fetch import read_rows
from tasks.prefect_task import quantdag_task

_VISION_STATS = ("image_tokens", "vision_forward_calls", "vision_embeddings")


# ------------------------------------------------------------------------------ fast statistics
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
    if getattr(module, "original_cls", None) is None or module.original_cls.forward is not torch.nn.Linear.forward:
        return False
    inputs, weights, outputs = module.input_quantizer, module.weight_quantizer, module.output_quantizer
    weight_done = weights._disabled or (_collects_max(weights) and weights._calibrator.compute_amax() is not None)
    return (outputs._disabled and _passes_through(outputs) and _passes_through(weights) and weight_done
            and (inputs._disabled and _passes_through(inputs) or _collects_max(inputs)))


def _fast_forward(module: torch.nn.Module, last: _LastInput, records: list) -> Any:
    """``forward`` for an eligible module: ``F.linear`` plus the (min, max) of its input."""
    original = type(module).forward
    weight, bias = module._parameters["weight"], module._parameters.get("bias")
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
        out = F.linear(x, weight, bias)
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


# ----------------------------------------------------------------------------- shared branches
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

    The same ``convert`` that ``mtq.calibrate`` applies, without recording a second calibration
    mode in the model's ModelOpt state (so the state matches a model calibrated once).
    """
    from modelopt.torch.quantization.mode import CalibrateModeRegistry, get_modelike_from_algo_cfg

    ((mode_name, algo_cfg),) = get_modelike_from_algo_cfg(algorithm)
    descriptor = CalibrateModeRegistry[mode_name]
    model.eval()
    descriptor.convert(model, descriptor.config_class(**algo_cfg), forward_loop=loop)
    return model


def calibrate_branches(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                       sources: dict[str, ImageTextSource | TextSource], store: ArtifactStore,
                       device: str = "auto", fast: bool = True) -> dict[str, ArtifactRef]:
    """Calibrate every branch in ``rows`` on one load of the base; store one state per branch.

    Args:
        base: the resolved base checkpoint.
        rows: branch kind (``image_text``, ``text``) -> rows artifact of its fetch step, in the
            order the branches run.
        recipe: the quantization recipe.
        sources: branch kind -> its calibration source settings.
        store: where the states go.
        device: ``auto``, ``cpu`` or ``cuda``.
        fast: run the data loops under :func:`fast_max_statistics` (same amax, fewer kernels).

    Returns:
        Branch kind -> ``quantizer-state`` artifact, each as :func:`tasks.calibrate.calibrate`
        writes it; ``meta`` adds ``model_loads`` (1 for the branch that loaded the model, 0 for
        the others, whose ``load_seconds`` is 0) and ``shared_branches``.

    Raises:
        ValueError: no branch, an unknown kind, a kind without its source, or an enabled input
            quantizer without a usable amax (each module named).
        RuntimeError: the image-text branch did not run the vision tower.
    """
    unknown = sorted(set(rows) - set(CALIBRATORS))
    if not rows or unknown or set(sources) < set(rows):
        raise ValueError(f"calibrate_branches: branches {sorted(rows)} (unknown: {unknown}) need sources "
                         f"{sorted(rows)}, got {sorted(sources)}; kinds are {sorted(CALIBRATORS)}")
    torch_device = modeling.pick_device(device)
    stats: dict[str, dict[str, float]] = {}
    loops: dict[str, ForwardLoop] = {}
    for kind, ref in rows.items():
        rows_dir, kind_rows = read_rows(store, ref)
        stats[kind] = {"rows": 0, "tokens": 0, **dict.fromkeys(_VISION_STATS, 0)}
        loop = CALIBRATORS[kind](base, rows_dir, kind_rows, sources[kind], torch_device, stats[kind])
        loops[kind] = fast_max_loop(loop) if fast else loop
    loaded = modeling.load_model(base, torch_device)
    if torch_device.type == "cpu":
        loaded.model.float()  # as tasks.calibrate does: no fast BF16 matmul on CPUs (exact upcast)
    import modelopt.torch.quantization as mtq

    config, model, refs = build_quant_config(recipe), loaded.model, {}
    for index, (kind, loop) in enumerate(loops.items()):
        start = time.perf_counter()
        if index == 0:
            model = mtq.quantize(model, config, forward_loop=loop)
        else:
            reset_calibration(model)
            recalibrate(model, config["algorithm"], loop)
        seconds = time.perf_counter() - start
        if kind == "image_text":
            check_vision(stats[kind])
        state = collect_state(model)
        require_valid_inputs(state, where=f"calibrate_{kind}")
        refs[kind] = _store_state(state, kind, stats[kind], store, {
            "load_seconds": loaded.load_seconds if index == 0 else 0.0,
            "model_loads": 1.0 if index == 0 else 0.0,
            "shared_branches": float(len(loops)),
            "calibrate_seconds": seconds,
            "tokens_per_second": stats[kind]["tokens"] / seconds if seconds else 0.0,
        })
    del model, loaded
    if torch_device.type == "cuda":  # a pooled worker process would otherwise keep the weights' memory cached
        torch.cuda.empty_cache()
    return refs


def _store_state(state: dict[str, Any], kind: str, stats: dict[str, float], store: ArtifactStore,
                 timing: dict[str, float]) -> ArtifactRef:
    metrics = {**stats, **timing, **amax_summary(state)}
    if kind != "image_text":
        for key in _VISION_STATS:
            metrics.pop(key)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_state(state, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return store.put_dir(out, STATE_KIND, {"kind": kind, "shard": 0, "num_shards": 1, **metrics})


@quantdag_task("calibrate_branches")
def calibrate_branches_task(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                            sources: dict[str, ImageTextSource | TextSource], artifact_store: str, device: str,
                            code_version: str) -> dict[str, ArtifactRef]:
    """Prefect wrapper of :func:`calibrate_branches` (one model load for every branch)."""
    return calibrate_branches(base, rows, recipe, sources, ArtifactStore(artifact_store), device)
