"""The llm-compressor -> ModelOpt NVFP4 converter on hand-made tensors (CPU, a few seconds).

Known values are written out by hand in compressed-tensors' convention (see the converter's
docstring), so a swapped nibble order, a global scale copied without inverting it, or a lost
block scale changes the dequantized numbers and fails these tests.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from quantdag.format.nvfp4 import dequantize_weight, quantize_weight

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "peer_convert.py"
_SPEC = importlib.util.spec_from_file_location("peer_convert", _PATH)
peer_convert = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = peer_convert  # dataclasses look their module up there
_SPEC.loader.exec_module(peer_convert)

# One row of 16 E2M1 values and the bytes compressed-tensors' pack_fp4_to_uint8 makes of them:
# codes 1, A, 7, 0, 3, F, 4, 5, 6, 9, 0, 0, 2, 2, E, D; byte i = code[2i] | code[2i + 1] << 4.
ELEMENTS = [0.5, -1.0, 6.0, 0.0, 1.5, -6.0, 2.0, 3.0, 4.0, -0.5, 0.0, 0.0, 1.0, 1.0, -4.0, -3.0]
PACKED = [0xA1, 0x07, 0xF3, 0x54, 0x96, 0x00, 0x22, 0xDE]

NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}


def _ct_config(**overrides: object) -> dict:
    group = {
        "format": "nvfp4-pack-quantized",
        "targets": ["Linear"],
        "weights": {**NVFP4_ARGS, "dynamic": False},
        "input_activations": {**NVFP4_ARGS, "dynamic": "local"},
        "output_activations": None,
    }
    config = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
              "config_groups": {"group_0": group}, "ignore": ["lm_head"], "kv_cache_scheme": None}
    config.update(overrides)
    return config


def _ct_module(weight: torch.Tensor, input_amax: float) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one linear, made from ModelOpt-convention NVFP4 of ``weight``."""
    q = quantize_weight(weight)
    return {
        "weight_packed": q.weight,
        "weight_scale": q.weight_scale,
        "weight_global_scale": (1.0 / q.weight_scale_2.double()).float().reshape(1),
        "input_global_scale": torch.tensor([6.0 * 448.0 / input_amax], dtype=torch.float32),
    }


def test_known_values_dequantize_identically() -> None:
    tensors = {
        "m.weight_packed": torch.tensor([PACKED], dtype=torch.uint8),
        "m.weight_scale": torch.tensor([[3.0]]).to(torch.float8_e4m3fn),
        "m.weight_global_scale": torch.tensor([4.0]),
        "m.input_global_scale": torch.tensor([8.0]),
        "norm.weight": torch.ones(16, dtype=torch.bfloat16),
    }
    converted, modules = peer_convert.convert_state_dict(tensors)
    assert modules == ("m",)
    assert set(converted) == {"m.weight", "m.weight_scale", "m.weight_scale_2", "m.input_scale", "norm.weight"}
    assert converted["m.weight_scale_2"].shape == () and converted["m.weight_scale_2"].dtype == torch.float32
    assert float(converted["m.weight_scale_2"]) == 0.25, "weight_scale_2 must be 1 / weight_global_scale"
    assert float(converted["m.input_scale"]) == 0.125, "input_scale must be 1 / input_global_scale"
    # compressed-tensors dequantizes x_q * (weight_scale / weight_global_scale) = x_q * 3 / 4
    expected = torch.tensor([ELEMENTS]) * 0.75
    got = dequantize_weight(converted["m.weight"], converted["m.weight_scale"], converted["m.weight_scale_2"])
    torch.testing.assert_close(got, expected, rtol=0, atol=0, msg="dequantized values differ from the hand-made ones")
    assert torch.equal(converted["norm.weight"], tensors["norm.weight"])


def test_round_trip_from_modelopt_convention() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 64, generator=generator) * 0.05
    reference = quantize_weight(weight)
    tensors = {f"layer.{k}": v for k, v in _ct_module(weight, input_amax=3.7).items()}
    converted, _ = peer_convert.convert_state_dict(tensors)
    assert torch.equal(converted["layer.weight"], reference.weight), "packed bytes must be copied unchanged"
    assert torch.equal(converted["layer.weight_scale"].view(torch.uint8), reference.weight_scale.view(torch.uint8))
    rel = abs(float(converted["layer.weight_scale_2"]) / float(reference.weight_scale_2) - 1.0)
    assert rel <= 2.0**-23, f"weight_scale_2 off by {rel:.3g} relative (more than float32 rounding)"
    torch.testing.assert_close(float(converted["layer.input_scale"]), 3.7 / (6 * 448), rtol=1e-6, atol=0)
    before = dequantize_weight(reference.weight, reference.weight_scale, reference.weight_scale_2)
    after = dequantize_weight(converted["layer.weight"], converted["layer.weight_scale"], converted["layer.weight_scale_2"])
    torch.testing.assert_close(after, before, rtol=1e-6, atol=0)


def test_every_offender_is_named() -> None:
    good = _ct_module(torch.randn(4, 32), 1.0)
    tensors = {f"a.{k}": v for k, v in good.items() if k != "input_global_scale"}
    tensors |= {f"b.{k}": v for k, v in good.items()} | {"b.weight_zero_point": torch.zeros(4, 2)}
    tensors |= {f"c.{k}": v for k, v in good.items()} | {"c.weight_global_scale": torch.tensor([0.0])}
    tensors |= {"d.weight_scale": good["weight_scale"]}
    with pytest.raises(ValueError) as err:
        peer_convert.convert_state_dict(tensors)
    message = str(err.value)
    for expected in ("a: missing ['input_global_scale']", "b.weight_zero_point", "c.weight_global_scale", "d.weight_scale"):
        assert expected in message, f"{expected!r} not named in:\n{message}"


def test_config_checks() -> None:
    assert peer_convert.modelopt_quant_config(_ct_config()) == {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ["lm_head"]}
    weight_only = _ct_config()
    weight_only["config_groups"]["group_0"]["input_activations"] = None
    with pytest.raises(ValueError, match="input_activations: absent"):
        peer_convert.modelopt_quant_config(weight_only)
    with pytest.raises(ValueError, match="kv_cache_scheme"):
        peer_convert.modelopt_quant_config(_ct_config(kv_cache_scheme={"num_bits": 8}))


def test_converted_checkpoint_reads_with_quantdag_reader(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from quantdag.format.reader import NVFP4Linear, load_nvfp4_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    config.architectures = ["LlamaForCausalLM"]
    generator = torch.Generator().manual_seed(1)
    shapes = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
              "self_attn.o_proj": (32, 32), "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64)}
    weights = {name: torch.randn(*shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    tensors = {"model.embed_tokens.weight": torch.randn(64, 32, generator=generator).to(torch.bfloat16),
               "model.norm.weight": torch.ones(32, dtype=torch.bfloat16),
               "model.layers.0.input_layernorm.weight": torch.ones(32, dtype=torch.bfloat16),
               "model.layers.0.post_attention_layernorm.weight": torch.ones(32, dtype=torch.bfloat16)}
    for name, weight in weights.items():
        tensors |= {f"model.layers.0.{name}.{k}": v for k, v in _ct_module(weight, input_amax=2.5).items()}
    source = tmp_path / "llmc"
    source.mkdir()
    save_file(tensors, str(source / "model.safetensors"))
    (source / "config.json").write_text(json.dumps({**config.to_dict(), "quantization_config": _ct_config()}))

    summary = peer_convert.convert_checkpoint(source, tmp_path / "export", producer_version="test")
    assert len(summary.quantized_modules) == 7 and summary.exclude_modules == ("lm_head",)
    loaded = load_nvfp4_model(tmp_path / "export", dtype=torch.float32)
    assert len(loaded.quantized_modules) == 7
    for name, weight in weights.items():
        layer = loaded.model.get_submodule(f"model.layers.0.{name}")
        assert isinstance(layer, NVFP4Linear), f"{name} was not read as NVFP4"
        q = quantize_weight(weight)
        expected = dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2)
        torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=0, msg=f"{name}: weight differs")
        torch.testing.assert_close(float(layer.input_scale), 2.5 / (6 * 448), rtol=1e-6, atol=0)
    logits = loaded.model(input_ids=torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, 64) and bool(torch.isfinite(logits).all())
