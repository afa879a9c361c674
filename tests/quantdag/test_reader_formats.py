"""The reader on every format a recipe can export: mixed NVFP4 + FP8, W4A16, local-Hessian block scales.

Each layer the reader builds is compared with ModelOpt's own fake quantization of the same BF16
weight with the same amax (the model the export was written from), so the file holds what was
calibrated and the reader reads what the file holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conf.recipe import GroupFormats, RecipeSpec
from quantdag.format.fp8 import FP8Linear
from quantdag.format.reader import NVFP4Linear, count_quantized, load_nvfp4_model
from tiny_models import build_tiny_llama
from tiny_recipe_exports import calibrate_tiny_llama, export_tiny_llama_recipe, recipe_model

MIXED = RecipeSpec(name="lh-fp8-attention", weight_scale="local_hessian", formats=GroupFormats(attention="fp8"))
W4A16 = RecipeSpec(name="w4a16", formats=GroupFormats(mlp="nvfp4_w4a16", attention="nvfp4_w4a16"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-exports")
    return {recipe.name: export_tiny_llama_recipe(root / recipe.name, recipe) for recipe in (MIXED, W4A16)}


def test_mixed_export_reads_fp8_attention_and_nvfp4_mlp_as_modelopt_quantized_them(exports: dict[str, Path]) -> None:
    from quantdag.calibration.cpu_kernels import cpu_nvfp4_kernels

    loaded = load_nvfp4_model(exports[MIXED.name])
    assert loaded.quant_algo == "MIXED_PRECISION" and len(loaded.quantized_modules) == 14
    layers = loaded.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, FP8Linear) and isinstance(layers[0].mlp.down_proj, NVFP4Linear)
    quantized = recipe_model(MIXED, calibrate_tiny_llama([MIXED]))
    with torch.no_grad(), cpu_nvfp4_kernels():
        for name in ("mlp.gate_proj", "mlp.down_proj"):  # searched static block scales, exported as calibrated
            source = quantized.model.layers[1].get_submodule(name)
            expected = source.weight_quantizer(source.weight.to(torch.bfloat16).float())
            assert torch.equal(layers[1].get_submodule(name).weight, expected), f"{name}: file != ModelOpt's fake quant"
        for name in ("self_attn.q_proj", "self_attn.v_proj"):
            source, read = quantized.model.layers[1].get_submodule(name), layers[1].get_submodule(name)
            weight = source.weight.to(torch.bfloat16)
            scale = source.weight_quantizer.amax.float().reshape(()) / 448
            exported = (weight / scale).to(torch.float8_e4m3fn).float() * scale  # ModelOpt's export: W / s in BF16
            assert torch.equal(read.weight, exported), f"{name}: the reader does not read what the export wrote"
            fake = source.weight_quantizer(weight.float())
            steps = (read.weight - fake).abs() / fake.abs().clamp_min(1e-30)
            assert float(steps.max()) <= 0.125 + 1e-6 and float((steps > 1e-3).float().mean()) < 0.1, (
                f"{name}: the file departs from ModelOpt's FP8 fake quantization by more than one E4M3 step")
    q_proj = layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    from quantdag.format.nvfp4 import fake_quantize_e4m3

    assert torch.equal(q_proj(x), torch.nn.functional.linear(fake_quantize_e4m3(x, 448 * q_proj.input_scale), q_proj.weight))


def test_w4a16_export_leaves_activations_unquantized(exports: dict[str, Path]) -> None:
    loaded = load_nvfp4_model(exports[W4A16.name], packed=True)
    assert loaded.quant_algo == "W4A16_NVFP4"
    down = loaded.model.model.layers[0].mlp.down_proj
    assert down.input_scale is None and "W4A16" in repr(down)
    dense = load_nvfp4_model(exports[W4A16.name]).model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 128)
    assert torch.equal(dense(x), torch.nn.functional.linear(x, dense.weight)), "no activation quantization"
    assert torch.allclose(down(x), dense(x), rtol=0, atol=1e-6)


def test_counts_give_fp8_one_byte_a_weight(exports: dict[str, Path]) -> None:
    counts = count_quantized(exports[MIXED.name])
    bf16 = build_tiny_llama()
    weights = sum(m.weight.numel() for n, m in bf16.named_modules() if n.endswith("_proj"))
    assert counts["quantized_linears"] == 14 and counts["quantized_params"] == weights
