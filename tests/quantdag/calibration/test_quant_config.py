"""Recipes as ModelOpt configs: the reference recipe's config is unchanged, each format its own entries."""

from __future__ import annotations

import json
from pathlib import Path

from conf.recipe import GroupFormats, RecipeSpec
from quantdag.calibration.recipe import build_quant_config, calibrates_directly, calibration_recipe

REFERENCE = Path(__file__).with_name("reference_quant_config.json")
"""``build_quant_config(RecipeSpec())`` as every release before recipes became data wrote it."""


def _json(config: dict) -> dict:
    return json.loads(json.dumps(config, default=str))


def _by_name(config: dict) -> dict[str, dict]:
    return {entry["quantizer_name"]: entry for entry in config["quant_cfg"]}


def test_reference_recipe_config_is_unchanged_entry_for_entry() -> None:
    assert _json(build_quant_config(RecipeSpec())) == json.loads(REFERENCE.read_text())


def test_group_formats_become_entries_before_modelopt_default_exclusions() -> None:
    recipe = RecipeSpec(name="mixed", formats=GroupFormats(attention="fp8", linear_attention="nvfp4_w4a16", mlp="bf16"))
    config = build_quant_config(recipe)
    names = [entry["quantizer_name"] for entry in config["quant_cfg"]]
    entries = _by_name(config)
    assert entries["*self_attn.q_proj.weight_quantizer"]["cfg"] == {"num_bits": (4, 3), "axis": None}
    assert entries["*self_attn.o_proj.input_quantizer"]["cfg"] == {"num_bits": (4, 3), "axis": None}
    assert entries["*linear_attn.in_proj_z.input_quantizer"] == {
        "quantizer_name": "*linear_attn.in_proj_z.input_quantizer", "enable": False}
    assert entries["*linear_attn.out_proj.weight_quantizer"]["cfg"]["block_sizes"]["type"] == "dynamic"
    assert entries["*mlp.down_proj.weight_quantizer"]["enable"] is False
    assert names.index("*self_attn.q_proj.weight_quantizer") < names.index("*lm_head*"), (
        "group entries must come before ModelOpt's default exclusions, which must keep winning")
    assert config["algorithm"] == "max"


def test_weight_scale_search_makes_nvfp4_weights_static_blocks() -> None:
    config = build_quant_config(RecipeSpec(weight_scale="local_hessian", fp8_scale_sweep=False))
    assert _by_name(config)["*weight_quantizer"]["cfg"]["block_sizes"]["type"] == "static"
    assert _by_name(config)["*input_quantizer"]["cfg"]["block_sizes"]["type"] == "dynamic"
    assert config["algorithm"] == {"method": "local_hessian", "fp8_scale_sweep": False}


def test_weight_only_lm_head_is_enabled_after_the_default_exclusions() -> None:
    excluded = [p for p in RecipeSpec().exclude_modules if p != "lm_head"]
    config = build_quant_config(RecipeSpec(formats=GroupFormats(lm_head="nvfp4_w4a16"), exclude_modules=excluded))
    names = [entry["quantizer_name"] for entry in config["quant_cfg"]]
    assert names.index("lm_head.weight_quantizer") > names.index("*lm_head*")
    assert "lm_head.input_quantizer" not in names


def test_one_calibration_recipe_for_a_list_keeps_only_shared_exclusions() -> None:
    reference = RecipeSpec()
    assert calibration_recipe([reference]) == reference and calibrates_directly(reference)
    keeps_down = RecipeSpec(name="other", weight_scale="mse",
                            exclude_modules=(*reference.exclude_modules, "*layers.1.mlp.down_proj"))
    shared = calibration_recipe([keeps_down, RecipeSpec(name="fp8", formats=GroupFormats(attention="fp8"))])
    assert shared == reference, "a module that one recipe quantizes is calibrated"
    assert not calibrates_directly(keeps_down)


def test_only_the_calibrations_own_recipe_exports_its_state_directly() -> None:
    from quantdag.calibration.recipe import exports_calibration

    calibration = RecipeSpec()
    assert exports_calibration(RecipeSpec(name="renamed"), calibration)
    assert not exports_calibration(RecipeSpec(name="no-kv", kv_cache="none"), calibration), (
        "exported from the calibration state, it would carry the calibration's FP8 KV cache")
    assert not exports_calibration(RecipeSpec(exclude_modules=("lm_head",)), calibration)
    assert not exports_calibration(RecipeSpec(weight_scale="mse"), calibration)
