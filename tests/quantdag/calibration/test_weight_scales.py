"""One calibration, many recipes: each recipe's state equals what ModelOpt computes for it in one go."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conf.recipe import GroupFormats, RecipeSpec
from tiny_models import build_tiny_llama
from tiny_recipe_exports import calibrate_tiny_llama, forward_loop, recipe_model

RECIPES = [
    RecipeSpec(name="lh", weight_scale="local_hessian"),
    RecipeSpec(name="mse-fp8-attention", weight_scale="mse", formats=GroupFormats(attention="fp8")),
    RecipeSpec(name="w4a16", formats=GroupFormats(mlp="nvfp4_w4a16", attention="nvfp4_w4a16")),
]


@pytest.fixture(scope="module")
def calibration() -> dict:
    return calibrate_tiny_llama(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_recipe_from_the_shared_calibration_equals_modelopt_in_one_go(recipe: RecipeSpec, calibration: dict) -> None:
    """The same amax, bit for bit, as ``mtq.quantize`` with the recipe's config and its own data pass."""
    import modelopt.torch.quantization as mtq

    from quantdag.calibration.cpu_kernels import cpu_nvfp4_kernels
    from quantdag.calibration.quantizer_state import collect_state
    from quantdag.calibration.recipe import build_quant_config

    with cpu_nvfp4_kernels():
        direct = collect_state(mtq.quantize(build_tiny_llama().float(), build_quant_config(recipe), forward_loop()))
    derived = collect_state(recipe_model(recipe, calibration))
    assert direct["input_quantizers"] == derived["input_quantizers"]
    assert set(direct["amax"]) == set(derived["amax"]) and set(direct.get("global_amax", {})) == set(
        derived.get("global_amax", {}))
    differ = [name for name in direct["amax"] if not torch.equal(direct["amax"][name], derived["amax"][name])]
    assert not differ, f"{recipe.name}: amax differ from ModelOpt's one-pass calibration: {differ}"
    if recipe.weight_scale != "max":
        searched = derived["amax"]["model.layers.0.mlp.down_proj.weight_quantizer"]
        assert searched.numel() == 64 * 128 // 16, "static blocks: one searched amax per 16 weights"


def test_missing_input_amax_names_every_module(calibration: dict) -> None:
    from quantdag.calibration.weight_scales import quantize_for_recipe

    partial = {**calibration, "amax": {k: v for k, v in calibration["amax"].items() if "layers.1.mlp" not in k}}
    with pytest.raises(ValueError, match=r"no input amax for 3 quantized module\(s\) \(model\.layers\.1\.mlp\.down_proj"):
        quantize_for_recipe(build_tiny_llama().float(), RecipeSpec(), partial)


def test_local_hessian_without_hessians_is_refused(calibration: dict) -> None:
    from quantdag.calibration.weight_scales import quantize_for_recipe

    with pytest.raises(ValueError, match="local_hessian needs the Hessians"):
        quantize_for_recipe(build_tiny_llama().float(), RECIPES[0], calibration)


def test_hessians_round_trip_through_their_file(tmp_path: Path) -> None:
    from quantdag.calibration.weight_scales import load_hessians, save_hessians

    hessians = {"model.layers.0.mlp.up_proj": (torch.randn(4, 16, 16), 96)}
    back = load_hessians(save_hessians(hessians, tmp_path))
    assert back.keys() == hessians.keys() and back["model.layers.0.mlp.up_proj"][1] == 96
    assert torch.equal(back["model.layers.0.mlp.up_proj"][0], hessians["model.layers.0.mlp.up_proj"][0])
