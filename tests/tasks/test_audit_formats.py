"""The audit against a recipe: mixed NVFP4 + FP8 and W4A16 exports pass with their recipe, and each break is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import audit_fixtures as fx
import pytest
import torch

from conf.recipe import GroupFormats, RecipeSpec
from tasks.audit import audit_checkpoint
from tiny_recipe_exports import export_tiny_llama_recipe

MIXED = RecipeSpec(name="mlp-nvfp4-attention-fp8", formats=GroupFormats(attention="fp8"))
W4A16 = RecipeSpec(name="w4a16", formats=GroupFormats(mlp="nvfp4_w4a16", attention="nvfp4_w4a16"), kv_cache="none")
Q0 = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit-recipes")
    out = {}
    for recipe in (MIXED, W4A16):
        out[recipe.name] = export_tiny_llama_recipe(root / recipe.name, recipe)
        fx.save_tokenizer(out[recipe.name])
    return out


@pytest.fixture
def mixed(sources: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(sources[MIXED.name], tmp_path / "mixed"))


def _failing(report) -> dict[str, set[str]]:
    rules: dict[str, set[str]] = {}
    for finding in report.findings:
        rules.setdefault(finding.rule, set()).add(finding.module)
    return rules


def test_exports_pass_with_their_own_recipe(sources: dict[str, Path]) -> None:
    for recipe in (MIXED, W4A16):
        report = audit_checkpoint(sources[recipe.name], None, recipe=recipe)
        assert report.passed, (recipe.name, report.findings)


def test_mixed_export_fails_against_the_reference_recipe_naming_the_fp8_modules(mixed: Path) -> None:
    failing = _failing(audit_checkpoint(mixed, None))
    assert {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"} <= failing["quantized-linear-format"]
    assert "hf_quant_config.json" in failing["kv-cache"], "declared MIXED_PRECISION, the recipe is NVFP4 alone"


def test_fp8_weight_nan_code_and_unshared_input_scale_are_named(mixed: Path) -> None:
    def damage(tensors: dict[str, torch.Tensor]) -> None:
        codes = tensors[f"{Q0}.o_proj.weight"].view(torch.uint8).clone()
        codes[0, 0] = 0x7F
        tensors[f"{Q0}.o_proj.weight"] = codes.view(torch.float8_e4m3fn)
        tensors[f"{Q0}.k_proj.input_scale"] = tensors[f"{Q0}.k_proj.input_scale"] * 2

    fx.edit_tensors(mixed, damage)
    report = audit_checkpoint(mixed, None, recipe=MIXED)
    failing = _failing(report)
    assert failing == {"quantized-linear-format": {f"{Q0}.o_proj"}, "fused-siblings": {f"{Q0}.qkv_proj [q_proj, k_proj, v_proj]"}}
    assert "1 NaN codes" in report.findings[0].message


def test_declared_layer_format_must_match_the_tensors(mixed: Path) -> None:
    fx.edit_json(mixed / "hf_quant_config.json", lambda c: c["quantization"]["quantized_layers"].update(
        {f"{Q0}.q_proj": {"quant_algo": "NVFP4", "group_size": 16}}))
    report = audit_checkpoint(mixed, None, recipe=MIXED)
    assert _failing(report) == {"kv-cache": {f"{Q0}.q_proj"}}


def test_w4a16_layer_with_an_input_scale_and_a_kv_cache_recipe_mismatch(sources: dict[str, Path], tmp_path: Path) -> None:
    export = Path(shutil.copytree(sources[W4A16.name], tmp_path / "w4a16"))
    fx.edit_tensors(export, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.input_scale", torch.tensor(0.01)))
    failing = _failing(audit_checkpoint(export, None, recipe=W4A16))
    assert failing == {"quantized-linear-format": {"model.layers.0.mlp.up_proj"}}
    fp8_kv = W4A16.model_copy(update={"kv_cache": "fp8_cast"})
    assert "hf_quant_config.json" in _failing(audit_checkpoint(sources[W4A16.name], None, recipe=fp8_kv))["kv-cache"]
