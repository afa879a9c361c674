"""Tiny exports of any recipe, made the way the pipeline makes them: one shared calibration, then the recipe.

:func:`export_tiny_llama_recipe` calibrates :func:`tiny_models.build_tiny_llama` once with the
calibration recipe (max, BF16 activations), derives the recipe's quantizer state with
``quantdag.calibration.weight_scales`` (Hessians gathered for ``local_hessian``), and exports with
ModelOpt plus ``tasks.export.declare_unquantized`` for mixed formats, all on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tiny_exports import calibration_ids
from tiny_models import build_tiny_llama


def calibrate_tiny_llama(recipes: list[Any], seed: int = 0) -> dict[str, Any]:
    """The merged-calibration state of the calibration recipe of ``recipes`` on the tiny Llama."""
    import modelopt.torch.quantization as mtq

    from quantdag.calibration.quantizer_state import collect_state
    from quantdag.calibration.recipe import build_quant_config, calibration_recipe

    model = build_tiny_llama(seed).float()
    return collect_state(mtq.quantize(model, build_quant_config(calibration_recipe(recipes)), forward_loop(seed)))


def forward_loop(seed: int = 0):
    """The calibration loop over :func:`tiny_exports.calibration_ids` through the decoder."""
    batches = calibration_ids(seed)

    def loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for input_ids in batches:
                model.model(input_ids=input_ids, use_cache=False)

    return loop


def recipe_model(recipe: Any, calibration: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The tiny Llama (float32 compute) with ``recipe``'s quantizers, shared input amax and weight scales."""
    from quantdag.calibration.weight_scales import collect_hessians, insert_quantizers, quantize_for_recipe

    model = build_tiny_llama(seed).float()
    if not recipe.needs_hessian:
        return quantize_for_recipe(model, recipe, calibration)
    model = insert_quantizers(model, recipe, calibration)
    return quantize_for_recipe(model, recipe, calibration, collect_hessians(model, forward_loop(seed)), quantized=True)


def export_tiny_llama_recipe(out_dir: str | Path, recipe: Any, seed: int = 0) -> Path:
    """Export the tiny Llama quantized with ``recipe`` (one shared calibration); returns ``out_dir``."""
    from modelopt.torch.export import export_hf_checkpoint

    from tasks.export import MIXED, declare_unquantized

    out = Path(out_dir)
    model = recipe_model(recipe, calibrate_tiny_llama([recipe], seed), seed)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    if '"MIXED_PRECISION"' in (out / "hf_quant_config.json").read_text():
        assert MIXED == "MIXED_PRECISION"
        declare_unquantized(out)
    return out
