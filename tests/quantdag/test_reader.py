"""The CPU reader against real ModelOpt exports of tiny Llama and Qwen3.5 models."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quantdag.format import nvfp4
from quantdag.format.reader import NVFP4Linear, count_quantized, load_nvfp4_model
from tiny_exports import export_tiny_llama_nvfp4, export_tiny_qwen3_5_nvfp4
from tiny_models import build_tiny_llama, build_tiny_qwen3_5

# Whole-model logits, reader (float32) vs the BF16 model run in float32. Each W4A4 GEMM adds about
# 0.1 relative error from the weights and 0.1 from the activations (NVFP4 on Gaussian-like data,
# see test_nvfp4), about 0.14 together, and FP8 K/V adds a few percent; the logits of the tiny
# models measured 0.09-0.14 over seeds 0-2. Below the floor the quantization was not applied.
LOGITS_REL_ERROR_MAX = 0.25
LOGITS_REL_ERROR_MIN = 0.02
# The constant-amax E4M3 cast of K/V: the tiny models' K/V are small (|v| < 1), partly in E4M3's
# subnormal range, and moved the logits by 3-8%; a real model's are far larger.
KV_EFFECT_MAX = 0.15
WEIGHT_REL_ERROR_MAX = 0.11  # NVFP4 on Gaussian weights: about 0.097


def _float_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(99))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=_token_ids()).logits


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return export_tiny_llama_nvfp4(tmp_path_factory.mktemp("llama") / "export", seed=0)


@pytest.fixture(scope="module")
def llama_bf16() -> nn.Module:
    return build_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def llama_loaded(llama_dir):
    return load_nvfp4_model(llama_dir)


def _quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def test_export_stores_nvfp4_tensors(llama_dir, llama_bf16):
    tensors = load_file(llama_dir / "model.safetensors")
    names = _quantized_names(llama_bf16)
    assert len(names) == 14
    for name in names:
        out_f, in_f = llama_bf16.get_submodule(name).weight.shape
        assert tensors[f"{name}.weight"].dtype == torch.uint8
        assert tensors[f"{name}.weight"].shape == (out_f, in_f // 2)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn
        assert tensors[f"{name}.weight_scale"].shape == (out_f, in_f // 16)
        for scalar in ("weight_scale_2", "input_scale"):
            assert tensors[f"{name}.{scalar}"].dtype == torch.float32
            assert tensors[f"{name}.{scalar}"].shape == ()
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    quant = json.loads((llama_dir / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["kv_cache_quant_algo"] == "FP8"


def test_exported_weights_are_the_originals_within_nvfp4_error(llama_dir, llama_bf16):
    tensors = load_file(llama_dir / "model.safetensors")
    for name in _quantized_names(llama_bf16):
        original = llama_bf16.get_submodule(name).weight.detach()
        packed, scale, scale_2 = (
            tensors[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")
        )
        # Re-quantizing the BF16 weight with the file's global scale gives ModelOpt's exact bytes:
        # nibble order, E4M3 scale rounding and E2M1 ties all agree.
        ours = nvfp4.quantize_weight(original, scale_2)
        assert torch.equal(ours.weight, packed), f"{name}: packed bytes differ from ModelOpt's"
        assert torch.equal(ours.weight_scale.view(torch.uint8), scale.view(torch.uint8)), name
        deq = nvfp4.dequantize_weight(packed, scale, scale_2)
        rel = _rel(deq, original.float())
        assert rel < WEIGHT_REL_ERROR_MAX, (
            f"{name}: relative error {rel:.4f} >= {WEIGHT_REL_ERROR_MAX}"
        )
        block_scale = (scale.float() * scale_2).repeat_interleave(16, dim=-1)
        assert torch.all((deq - original.float()).abs() <= block_scale * (1 + 1e-6)), name


def test_reader_builds_nvfp4_linears_from_the_file(llama_dir, llama_bf16, llama_loaded):
    model, tensors = llama_loaded.model, load_file(llama_dir / "model.safetensors")
    names = _quantized_names(llama_bf16)
    assert list(llama_loaded.quantized_modules) == sorted(names)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, NVFP4Linear), name
        expected = nvfp4.dequantize_weight(
            *(tensors[f"{name}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2"))
        )
        assert torch.equal(layer.weight, expected), name
        assert torch.equal(layer.input_scale, tensors[f"{name}.input_scale"]), name
    assert type(model.lm_head) is nn.Linear
    assert torch.equal(model.lm_head.weight, llama_bf16.lm_head.weight.float())
    assert model.lm_head.weight.dtype == torch.float32
    reference_buffers = dict(_float_copy(llama_bf16).named_buffers())
    for name, buffer in model.named_buffers():
        if name in reference_buffers:
            assert torch.equal(buffer, reference_buffers[name]), f"buffer {name} not rebuilt"
    assert llama_loaded.kv_cache_quant_algo == "FP8" and llama_loaded.kv_cache_fake_quant
    for layer in model.model.layers:
        assert layer.self_attn.fp8_kv_amax == (448.0, 448.0)  # fp8_cast: constant amax


def test_nvfp4_linear_fake_quantizes_its_input(llama_loaded):
    layer = llama_loaded.model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(4)) * 0.05
    expected = F.linear(nvfp4.fake_quantize_activation(x, layer.input_scale), layer.weight)
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(out, expected)
    unquantized = F.linear(x, layer.weight)
    assert _rel(out, unquantized) > 0.01, "the input was not quantized"


def test_reader_logits_are_close_to_bf16_but_quantized(llama_loaded, llama_bf16):
    reference = _logits(_float_copy(llama_bf16))
    logits = _logits(llama_loaded.model)
    rel = _rel(logits, reference)
    assert rel < LOGITS_REL_ERROR_MAX, f"logits relative error {rel:.4f} >= {LOGITS_REL_ERROR_MAX}"
    assert rel > LOGITS_REL_ERROR_MIN, f"logits relative error {rel:.4f}: quantization not applied?"


def test_fp8_kv_fake_quant_is_applied(llama_dir, llama_loaded):
    plain_kv = load_nvfp4_model(llama_dir, fake_quant_kv=False)
    assert not plain_kv.kv_cache_fake_quant
    effect = _rel(_logits(llama_loaded.model), _logits(plain_kv.model))
    assert 1e-4 < effect < KV_EFFECT_MAX, f"FP8 K/V moved the logits by {effect:.4f}"


def test_fp8_kv_attention_quantizes_both_k_and_v(llama_loaded):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = llama_loaded.model
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=generator) * 0.3 for _ in range(3))
    name = model.config._attn_implementation
    assert name != "sdpa", "the reader did not install its FP8 K/V attention"
    out, _ = ALL_ATTENTION_FUNCTIONS[name](attention, q, k, v, None, scaling=0.25)
    fq = nvfp4.fake_quantize_e4m3
    expected, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attention, q, fq(k), fq(v), None, scaling=0.25)
    assert torch.equal(out, expected)
    for half_quantized in ((q, fq(k), v), (q, k, fq(v))):
        partial, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](attention, *half_quantized, None, scaling=0.25)
        assert not torch.equal(out, partial), "K and V must both be quantized"


def test_sharded_export_loads_identically(llama_dir, llama_loaded, tmp_path):
    tensors = load_file(llama_dir / "model.safetensors")
    shutil.copytree(llama_dir, tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file(
            {k: tensors[k] for k in part}, tmp_path / "sharded" / file, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(part, file))
    index_file = tmp_path / "sharded" / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = load_nvfp4_model(tmp_path / "sharded")
    assert torch.equal(_logits(sharded.model), _logits(llama_loaded.model))


def test_count_quantized(llama_dir, llama_bf16):
    counts = count_quantized(llama_dir)
    names = _quantized_names(llama_bf16)
    shapes = [llama_bf16.get_submodule(n).weight.shape for n in names]
    params = sum(o * i for o, i in shapes)
    other = sum(
        p.numel() * 2 for n, p in llama_bf16.named_parameters() if n.rsplit(".", 1)[0] not in names
    )
    assert counts == {
        "quantized_linears": 14,
        "excluded_linears": 1,
        "quantized_params": params,
        "quantized_bytes": params // 2 + params // 16 + 14 * 8,
        "unquantized_bytes": other,
        "ignored_bytes": 0,
        "total_bytes": params // 2 + params // 16 + 14 * 8 + other,
    }


def test_tied_embeddings_export_loads_with_lm_head_tied(tmp_path):
    export_dir = export_tiny_llama_nvfp4(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    with safe_open(export_dir / "model.safetensors", framework="pt") as handle:
        stored = set(handle.keys())
    assert "lm_head.weight" not in stored, "ModelOpt drops the tied alias"
    model = load_nvfp4_model(export_dir).model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = _float_copy(build_tiny_llama(seed=1, tie_word_embeddings=True))
    rel = _rel(_logits(model), _logits(reference))
    assert LOGITS_REL_ERROR_MIN < rel < LOGITS_REL_ERROR_MAX, f"logits relative error {rel:.4f}"

    config = json.loads((export_dir / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (export_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] are not in the checkpoint"):
        load_nvfp4_model(export_dir)


def _rewrite(export_dir: Path, target: Path, edit_tensors=None, edit_quant=None) -> Path:
    shutil.copytree(export_dir, target)
    if edit_tensors:
        tensors = load_file(target / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if edit_quant:
        config = json.loads((target / "hf_quant_config.json").read_text())
        edit_quant(config["quantization"])
        (target / "hf_quant_config.json").write_text(json.dumps(config))
    return target


def test_malformed_exports_raise_value_error_naming_every_offender(llama_dir, tmp_path):
    def break_tensors(tensors):
        del tensors["model.layers.1.mlp.up_proj.input_scale"]
        tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.zeros(64, 3).to(
            torch.float8_e4m3fn
        )
        tensors["model.layers.0.mystery.weight"] = torch.zeros(4)

    broken = _rewrite(llama_dir, tmp_path / "broken", edit_tensors=break_tensors)
    with pytest.raises(ValueError) as raised:
        load_nvfp4_model(broken)
    message = str(raised.value)
    assert "model.layers.1.mlp.up_proj: NVFP4 tensors missing ['input_scale']" in message
    assert "model.layers.0.self_attn.q_proj: weight_scale is F8_E4M3[64, 3]" in message
    assert "model.layers.0.mystery.weight: not a parameter or buffer" in message

    int4 = _rewrite(llama_dir, tmp_path / "int4", edit_quant=lambda q: q.update(quant_algo="W4A16_AWQ"))
    with pytest.raises(ValueError, match="quant_algo is 'W4A16_AWQ'"):
        load_nvfp4_model(int4)
    with pytest.raises(ValueError, match="quant_algo is 'W4A16_AWQ'"):
        count_quantized(int4)
    fp8 = _rewrite(llama_dir, tmp_path / "fp8", edit_quant=lambda q: q.update(quant_algo="FP8"))
    with pytest.raises(ValueError, match=r"q_proj: weight is U8\[64, 32\], expected F8_E4M3\[64, 64\]"):
        load_nvfp4_model(fp8)  # NVFP4 tensors under an FP8 label: every layer named

    nvfp4_kv = _rewrite(
        llama_dir, tmp_path / "kv", edit_quant=lambda q: q.update(kv_cache_quant_algo="NVFP4")
    )
    with pytest.raises(ValueError, match="fake_quant_kv=False"):
        load_nvfp4_model(nvfp4_kv)
    assert not load_nvfp4_model(nvfp4_kv, fake_quant_kv=False).kv_cache_fake_quant

    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="hf_quant_config.json: file is missing"):
        load_nvfp4_model(tmp_path / "bare")


def test_qwen3_5_vlm_export_loads_language_model_nvfp4_and_ignores_mtp(tmp_path):
    export_dir = export_tiny_qwen3_5_nvfp4(tmp_path / "qwen", seed=0)
    bf16 = build_tiny_qwen3_5(seed=0)
    loaded = load_nvfp4_model(export_dir)
    model = loaded.model

    assert loaded.ignored_keys == (
        "mtp.fc.weight",
        "mtp.layers.0.mlp.down_proj.weight",
        "mtp.norm.weight",
    )
    quantized = [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)]
    assert len(quantized) == 25 and list(loaded.quantized_modules) == sorted(quantized)
    assert all(n.startswith("model.language_model.layers.") for n in quantized)
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert all(
        n.startswith("model.visual.") or n.endswith(("in_proj_a", "in_proj_b", "lm_head"))
        for n in kept
    )
    for name in kept:
        assert torch.equal(
            model.get_submodule(name).weight, bf16.get_submodule(name).weight.float()
        ), name
    assert "model.visual*" in loaded.exclude_modules
    with_kv = [n for n, m in model.named_modules() if hasattr(m, "fp8_kv_amax")]
    assert with_kv == ["model.language_model.layers.3.self_attn"], (
        "only full attention has a KV cache"
    )

    rel = _rel(_logits(model), _logits(_float_copy(bf16)))
    assert LOGITS_REL_ERROR_MIN < rel < LOGITS_REL_ERROR_MAX, f"logits relative error {rel:.4f}"

    counts = count_quantized(export_dir)
    assert counts["quantized_linears"] == 25
    assert counts["excluded_linears"] == 17  # lm_head, 3 x in_proj_a/b, 10 in the vision tower
    assert counts["ignored_bytes"] == (2 * 64 * 128 + 64) * 2  # three BF16 mtp.* tensors


def test_packed_linears_give_the_same_logits_in_a_quarter_of_the_memory(llama_dir):
    from quantdag.format.reader import PackedNVFP4Linear

    plain = load_nvfp4_model(llama_dir, dtype=torch.float32).model
    packed = load_nvfp4_model(llama_dir, dtype=torch.float32, packed=True).model
    assert any(isinstance(m, PackedNVFP4Linear) for m in packed.modules())
    assert not [n for n, p in packed.named_parameters() if p.device.type == "meta"], "every parameter read"
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, packed(input_ids=ids).logits)

    def linear_bytes(model):
        return sum(t.numel() * t.element_size() for m in model.modules() if "NVFP4" in type(m).__name__
                   for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])

    assert linear_bytes(packed) < linear_bytes(plain) / 4, (linear_bytes(packed), linear_bytes(plain))
