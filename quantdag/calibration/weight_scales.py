"""A recipe's quantizer state from a shared calibration: its quantizers, the shared input amax, its weight scales.

Max calibration collects BF16 activations with fake quantization off, so one calibration (of
:func:`quantdag.calibration.recipe.calibration_recipe`) holds the input amax of every recipe.
For one recipe, :func:`quantize_for_recipe` then:

1. inserts the recipe's quantizers (``mtq.quantize`` with its config and no forward loop: weight
   amax are computed from the weights alone, ``max`` of each tensor or block, as a calibration
   pass would; an ``mse`` recipe also runs ModelOpt's weight search, which needs no data);
2. loads every enabled input quantizer's amax from the shared calibration state;
3. for ``local_hessian``, runs ModelOpt's Hessian-weighted weight search with the per-layer
   Hessians that :func:`collect_hessians` gathered (a step of its own, cached per recipe).

:func:`collect_hessians` is phase 2 of ModelOpt 0.47's ``local_hessian_calibrate``: a forward pass
over the calibration rows with weight fake quantization off and input quantizers on, summing
``XᵀX`` per 16-wide input block of every quantized linear (``_LocalHessianAccumulator``). The
weight search is its phase 3 (``_mse_calibrate_weights`` with the Hessian error function): the
same ModelOpt functions, fed from stored Hessians. On the CPU both run through
:func:`quantdag.calibration.cpu_kernels.cpu_nvfp4_kernels`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from conf.recipe import RecipeSpec
from quantdag.calibration.cpu_kernels import cpu_nvfp4_kernels
from quantdag.calibration.recipe import build_quant_config

HESSIAN_FILE = "hessians.safetensors"
HESSIAN_BLOCK = 16
"""Input features per local Hessian block: NVFP4's block size, as ModelOpt's ``block_size`` default."""


def quantize_for_recipe(model: torch.nn.Module, recipe: RecipeSpec, calibration: dict[str, Any],
                        hessians: dict[str, tuple[torch.Tensor, int]] | None = None,
                        quantized: bool = False) -> torch.nn.Module:
    """Give a BF16 ``model`` the quantizers of ``recipe``, the shared input amax and the recipe's weight scales.

    Args:
        model: the BF16 base as loaded (or, with ``quantized``, one that already holds ``recipe``'s
            quantizers, as :func:`collect_hessians` leaves it).
        recipe: the recipe.
        calibration: a merged quantizer state of a max calibration covering the recipe's quantized
            modules (``quantdag.calibration.quantizer_state``); only its input amax are read.
        hessians: module name -> (sum of ``XᵀX`` per input block ``float32 [in/16, 16, 16]``, tokens),
            required for ``weight_scale: local_hessian``.
        quantized: ``model`` already has the recipe's quantizers (skip their insertion).

    Returns:
        ``model`` with every weight and input amax set; ready for ``collect_state`` and export.

    Raises:
        ValueError: an enabled input quantizer has no amax in ``calibration`` (all named), or a
            ``local_hessian`` recipe came without Hessians, or they miss a quantized linear.
    """
    import modelopt.torch.quantization as mtq

    if recipe.needs_hessian and not hessians:
        raise ValueError(f"recipe {recipe.name}: weight_scale local_hessian needs the Hessians of the hessian step")
    config = build_quant_config(recipe)
    with cpu_nvfp4_kernels():
        if not quantized:
            insert = config if recipe.weight_scale == "mse" else {**config, "algorithm": "max"}
            model = mtq.quantize(model, insert, forward_loop=None)
        load_input_amax(model, calibration, where=f"recipe {recipe.name}")
        if recipe.needs_hessian:
            search_with_hessians(model, hessians, recipe.fp8_scale_sweep)
    return model


def insert_quantizers(model: torch.nn.Module, recipe: RecipeSpec, calibration: dict[str, Any]) -> torch.nn.Module:
    """``recipe``'s quantizers with max weight amax and the shared input amax (what :func:`collect_hessians` runs).

    Raises:
        ValueError: as :func:`load_input_amax`.
    """
    import modelopt.torch.quantization as mtq

    with cpu_nvfp4_kernels():
        model = mtq.quantize(model, {**build_quant_config(recipe), "algorithm": "max"}, forward_loop=None)
    load_input_amax(model, calibration, where=f"recipe {recipe.name}")
    return model


def load_input_amax(model: torch.nn.Module, calibration: dict[str, Any], where: str) -> int:
    """Set the amax of every enabled, calibrated input quantizer of ``model`` from ``calibration``; returns how many.

    Raises:
        ValueError: names every enabled input quantizer that ``calibration`` has no amax for
            (the shared calibration excluded its module), and the fix.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    wanted = {name: q for name, q in model.named_modules()
              if isinstance(q, TensorQuantizer) and name.endswith("input_quantizer") and q.is_enabled
              and not q._use_constant_amax and q._constant_amax is None}
    missing = sorted(name for name in wanted if name not in calibration["amax"])
    if missing:
        shown = ", ".join(name.removesuffix(".input_quantizer") for name in missing[:8])
        raise ValueError(f"{where}: the shared calibration has no input amax for {len(missing)} quantized module(s) "
                         f"({shown}{', ...' if len(missing) > 8 else ''}); calibrate with a recipe list whose "
                         "shared exclusions leave these modules in (calibration_recipe)")
    for name, quantizer in wanted.items():
        quantizer.amax = calibration["amax"][name].to(device)
    return len(wanted)


def _hessian_targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Quantized linears whose enabled weight quantizer a local-Hessian search refines (2-D weight, in % 16 == 0)."""
    from modelopt.torch.quantization.utils import is_quantized_linear

    return {name: module for name, module in model.named_modules()
            if is_quantized_linear(module) and module.weight_quantizer.is_enabled
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2
            and module.weight.shape[1] % HESSIAN_BLOCK == 0}


def collect_hessians(model: torch.nn.Module, loop: Callable[[torch.nn.Module], None]) -> dict[str, tuple[torch.Tensor, int]]:
    """Sum ``XᵀX`` per 16-wide input block for every quantized linear over one forward pass of ``loop``.

    As ModelOpt's ``local_hessian_calibrate`` phase 2: weight fake quantization is off, input
    quantizers (and the KV cache) stay on, ``X`` is each linear's input before its input quantizer,
    accumulated in float32 by ModelOpt's ``_LocalHessianAccumulator``.

    Args:
        model: a model with the recipe's quantizers and input amax (:func:`insert_quantizers`).
        loop: the calibration forward loop.

    Returns:
        Module name -> (``float32 [in/16, 16, 16]`` sum over tokens, tokens seen).

    Raises:
        ValueError: a quantized linear never ran (its name listed).
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.model_calib import _LocalHessianAccumulator

    targets = _hessian_targets(model)
    accumulators = {name: _LocalHessianAccumulator(m.weight.shape[0], m.weight.shape[1], HESSIAN_BLOCK)
                    for name, m in targets.items()}
    handles = [module.register_forward_pre_hook(lambda _, args, acc=accumulators[name]: acc.accumulate(args[0]))
               for name, module in targets.items()]
    try:
        with cpu_nvfp4_kernels(), mtq.set_quantizer_by_cfg_context(
                model, [{"quantizer_name": "*weight_quantizer", "enable": False}]), torch.no_grad():
            loop(model)
    finally:
        for handle in handles:
            handle.remove()
    silent = sorted(name for name, acc in accumulators.items() if acc.hessian_per_block is None)
    if silent:
        raise ValueError(f"collect_hessians: {len(silent)} quantized linear(s) never ran: {', '.join(silent[:8])}")
    return {name: (acc.hessian_per_block.detach().cpu(), acc.num_samples) for name, acc in accumulators.items()}


def search_with_hessians(model: torch.nn.Module, hessians: dict[str, tuple[torch.Tensor, int]],
                         fp8_scale_sweep: bool = True) -> int:
    """ModelOpt's local-Hessian weight search (``local_hessian_calibrate`` phase 3) from stored Hessians.

    Returns:
        The number of weight quantizers searched with a Hessian.

    Raises:
        ValueError: a quantized linear of ``model`` has no Hessian (all named).
    """
    from modelopt.torch.quantization.model_calib import _LocalHessianAccumulator, _mse_calibrate_weights

    targets = _hessian_targets(model)
    missing = sorted(set(targets) - set(hessians))
    if missing:
        raise ValueError(f"no Hessian for {len(missing)} quantized linear(s): {', '.join(missing[:8])}; "
                         "the hessian step ran with another recipe or base")
    by_quantizer: dict[int, _LocalHessianAccumulator] = {}
    for name, module in targets.items():
        accumulator = _LocalHessianAccumulator(module.weight.shape[0], module.weight.shape[1], HESSIAN_BLOCK)
        total, tokens = hessians[name]
        accumulator.hessian_per_block = total.to(module.weight.device, torch.float32).clone()
        accumulator.num_samples = int(tokens)
        by_quantizer[id(module.weight_quantizer)] = accumulator
    errors = {key: acc.build_error_func() for key, acc in by_quantizer.items()}
    normalized = {key: acc.normalized_hessian() for key, acc in by_quantizer.items()}
    with cpu_nvfp4_kernels():
        _mse_calibrate_weights(model, dict(model.named_modules()), step_size=0.1, start_multiplier=0.25,
                               stop_multiplier=4.0, fp8_scale_sweep=fp8_scale_sweep,
                               error_func_for=lambda q: errors.get(id(q)), hessian_for=lambda q: normalized.get(id(q)))
    return len(by_quantizer)


def save_hessians(hessians: dict[str, tuple[torch.Tensor, int]], directory: Path) -> Path:
    """Write ``hessians.safetensors``: one ``float32 [in/16, 16, 16]`` tensor per module, token counts in the metadata."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HESSIAN_FILE
    save_file({name: total.contiguous() for name, (total, _) in hessians.items()}, str(path),
              metadata={name: str(tokens) for name, (_, tokens) in hessians.items()})
    return path


def load_hessians(path: Path) -> dict[str, tuple[torch.Tensor, int]]:
    """Read a file written by :func:`save_hessians`.

    Raises:
        ValueError: a tensor has no token count in the metadata.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        counts = handle.metadata() or {}
        missing = [name for name in handle.keys() if name not in counts]
        if missing:
            raise ValueError(f"{path}: no token count for {missing[:5]}; not a file of save_hessians")
        return {name: (handle.get_tensor(name), int(counts[name])) for name in handle.keys()}
