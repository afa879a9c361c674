"""The synthetic Qwen3.5 checkpoint: loads, processes a mirror row, runs the full VLM, carries MTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantdag.demo.dims import Qwen35Dims, qwen3_5_config
from quantdag.demo.tiny_model import build_qwen3_5_checkpoint
from quantdag.demo.weights import model_specs, mtp_specs

IMAGE_PAD, VISION_START, VISION_END = 248056, 248053, 248054

# Per-layer parameter shapes of Qwen/Qwen3.6-27B (its model.safetensors.index.json and config.json:
# hidden 5120; Gated-DeltaNet qkv = 2 * 16 * 128 + 48 * 128 = 10240; gated attention q = 2 * 24 * 256).
REAL_LINEAR_ATTENTION_LAYER = {
    "input_layernorm.weight": (5120,),
    "post_attention_layernorm.weight": (5120,),
    "linear_attn.in_proj_qkv.weight": (10240, 5120),
    "linear_attn.in_proj_z.weight": (6144, 5120),
    "linear_attn.in_proj_b.weight": (48, 5120),
    "linear_attn.in_proj_a.weight": (48, 5120),
    "linear_attn.conv1d.weight": (10240, 1, 4),
    "linear_attn.dt_bias": (48,),
    "linear_attn.A_log": (48,),
    "linear_attn.norm.weight": (128,),
    "linear_attn.out_proj.weight": (5120, 6144),
    "mlp.gate_proj.weight": (17408, 5120),
    "mlp.up_proj.weight": (17408, 5120),
    "mlp.down_proj.weight": (5120, 17408),
}
REAL_FULL_ATTENTION_LAYER = {
    "input_layernorm.weight": (5120,),
    "post_attention_layernorm.weight": (5120,),
    "self_attn.q_proj.weight": (12288, 5120),
    "self_attn.k_proj.weight": (1024, 5120),
    "self_attn.v_proj.weight": (1024, 5120),
    "self_attn.o_proj.weight": (5120, 6144),
    "self_attn.q_norm.weight": (256,),
    "self_attn.k_norm.weight": (256,),
    "mlp.gate_proj.weight": (17408, 5120),
    "mlp.up_proj.weight": (17408, 5120),
    "mlp.down_proj.weight": (5120, 17408),
}
REAL_OTHER = {
    "model.language_model.embed_tokens.weight": (248320, 5120),
    "model.language_model.norm.weight": (5120,),
    "lm_head.weight": (248320, 5120),
    "model.visual.patch_embed.proj.weight": (1152, 3, 2, 16, 16),
    "model.visual.patch_embed.proj.bias": (1152,),
    "model.visual.pos_embed.weight": (2304, 1152),
    "model.visual.blocks.26.attn.qkv.weight": (3456, 1152),
    "model.visual.blocks.26.attn.proj.weight": (1152, 1152),
    "model.visual.blocks.26.mlp.linear_fc1.weight": (4304, 1152),
    "model.visual.blocks.26.mlp.linear_fc2.weight": (1152, 4304),
    "model.visual.blocks.26.norm1.weight": (1152,),
    "model.visual.merger.norm.weight": (1152,),
    "model.visual.merger.linear_fc1.weight": (4608, 4608),
    "model.visual.merger.linear_fc2.weight": (5120, 4608),
}
REAL_MTP = {
    "mtp.fc.weight": (5120, 10240),
    "mtp.pre_fc_norm_embedding.weight": (5120,),
    "mtp.pre_fc_norm_hidden.weight": (5120,),
    "mtp.norm.weight": (5120,),
    **{f"mtp.layers.0.{name}": shape for name, shape in REAL_FULL_ATTENTION_LAYER.items()},
}


def _meta_shapes(dims: Qwen35Dims) -> dict[str, tuple[int, ...]]:
    from transformers import Qwen3_5ForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(qwen3_5_config(dims))
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("num_layers", [1, 4])
def test_qwen3_6_27b_dims_give_the_real_shapes(num_layers: int) -> None:
    dims = Qwen35Dims.qwen3_6_27b(num_layers)
    shapes = _meta_shapes(dims)
    expected = dict(REAL_OTHER)
    for index, kind in enumerate(dims.layer_types):
        layer = REAL_FULL_ATTENTION_LAYER if kind == "full_attention" else REAL_LINEAR_ATTENTION_LAYER
        expected.update({f"model.language_model.layers.{index}.{k}": v for k, v in layer.items()})
    assert {k: shapes.get(k) for k in expected} == expected
    layer_keys = {k for k in shapes if k.startswith("model.language_model.layers.")}
    assert layer_keys == {k for k in expected if k.startswith("model.language_model.layers.")}
    assert sum(k.startswith("model.visual.blocks.") and k.endswith("attn.qkv.weight") for k in shapes) == 27
    assert (
        dims.layer_types == ["linear_attention", "linear_attention", "linear_attention", "full_attention"][:num_layers]
    )
    config = qwen3_5_config(dims)
    assert config.text_config.rope_parameters["mrope_section"] == [11, 11, 10]
    assert {s.name: s.shape for s in mtp_specs(config)} == REAL_MTP


def test_every_linear_input_is_a_multiple_of_16() -> None:
    from transformers import Qwen3_5ForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(qwen3_5_config(Qwen35Dims()))
    bad = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 16}
    assert not bad, f"Linear layers NVFP4 cannot block by 16: {bad}"


def test_dims_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="hidden_size=100 is not a multiple of 16"):
        Qwen35Dims(hidden_size=100, vision_out_hidden_size=100)
    with pytest.raises(ValueError, match="vision_out_hidden_size"):
        Qwen35Dims(hidden_size=256)
    with pytest.raises(ValueError, match="num_layers=0"):
        Qwen35Dims.qwen3_6_27b(0)


def test_loads_with_every_key_and_the_vlm_classes(tiny_checkpoint: Path, tiny_processor) -> None:
    from transformers import AutoModelForImageTextToText, Qwen3_5ForConditionalGeneration

    model, info = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    auto = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    assert type(auto).__name__ == "Qwen3_5ForConditionalGeneration"
    processor = tiny_processor
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.image_processor.patch_size == 16 and processor.image_processor.merge_size == 2
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["image_token_id"] == IMAGE_PAD and config["text_config"]["vocab_size"] == 248320
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [248046, 248044]
    # Initial values: unit-scale norms, N(0, 0.02) matrices, A_log = log U(1, 16).
    lm = model.model.language_model
    assert torch.count_nonzero(lm.norm.weight) == 0, "Qwen3_5RMSNorm scales by (1 + w): w must start at 0"
    assert torch.all(lm.layers[0].linear_attn.norm.weight == 1)
    a_log = lm.layers[0].linear_attn.A_log.float()
    assert a_log.min() >= 0 and a_log.max() <= torch.log(torch.tensor(16.0)) + 1e-2
    std = lm.layers[0].mlp.down_proj.weight.float().std().item()
    assert abs(std - 0.02) < 0.002, f"down_proj std {std}"


def test_safetensors_carry_the_mtp_head(tiny_checkpoint: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        mtp = {k: tuple(handle.get_slice(k).get_shape()) for k in keys if k.startswith("mtp.")}
        assert handle.get_slice("mtp.fc.weight").get_dtype() == "BF16"
    assert mtp["mtp.fc.weight"] == (128, 256)
    assert mtp["mtp.layers.0.self_attn.q_proj.weight"] == (4 * 64 * 2, 128)
    expected = {s.name for s in mtp_specs(qwen3_5_config(Qwen35Dims()))}
    assert set(mtp) == expected and len(expected) == 15
    assert keys == expected | {s.name for s in model_specs(qwen3_5_config(Qwen35Dims()))}


def test_full_vlm_forward_on_a_mirror_row(tiny_checkpoint: Path, tiny_processor, mirror_root: Path) -> None:
    """Processor -> pixel_values -> vision tower -> LM, with the image's placeholders counted."""
    from transformers import Qwen3_5ForConditionalGeneration

    from quantdag.demo.corpus import load_mirror_image

    row = json.loads((mirror_root / "plotqa_cot" / "plotqa_cot.jsonl").read_text().splitlines()[0])
    image = load_mirror_image(mirror_root, "plotqa_cot", row["messages"][0]["content"][0]["image"])
    processor = tiny_processor
    prompt = processor.apply_chat_template(row["messages"], tokenize=False)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")

    grid = inputs["image_grid_thw"]
    merge = processor.image_processor.merge_size
    ids = inputs["input_ids"][0]
    assert grid.shape == (1, 3) and grid[0, 0] == 1
    assert int((ids == IMAGE_PAD).sum()) == int(grid.prod()) // merge**2
    assert int((ids == VISION_START).sum()) == 1 and int((ids == VISION_END).sum()) == 1
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 16 * 16)

    model = Qwen3_5ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    calls = []
    hook = model.model.visual.register_forward_hook(lambda module, args, output: calls.append(1))
    with torch.no_grad():
        logits = model(**inputs).logits
        blank = inputs["pixel_values"].clone().zero_()
        logits_blank = model(**{**inputs, "pixel_values": blank}).logits
    hook.remove()
    assert len(calls) == 2, "the vision tower did not run"
    assert logits.shape == (1, ids.numel(), 248320) and torch.isfinite(logits).all()
    after_image = int((ids == VISION_END).nonzero()[0, 0])
    change = (logits[0, after_image:] - logits_blank[0, after_image:]).abs().max().item()
    assert change > 1e-3, f"text logits ignore the image (max change {change})"


@pytest.mark.parametrize("subset", ["sparsetables", "plotqa_cot", "wiki_en"])
def test_processor_placeholders_match_the_grid(tiny_processor, mirror_root: Path, subset: str) -> None:
    from quantdag.demo.corpus import load_mirror_image

    processor = tiny_processor
    grids = set()
    for line in (mirror_root / subset / f"{subset}.jsonl").read_text().splitlines():
        row = json.loads(line)
        image = load_mirror_image(mirror_root, subset, row["messages"][0]["content"][0]["image"])
        inputs = processor(text=[processor.apply_chat_template(row["messages"], tokenize=False)], images=[image])
        grid = inputs["image_grid_thw"][0]
        assert sum(i == IMAGE_PAD for i in inputs["input_ids"][0]) == int(grid.prod()) // 4
        grids.add(tuple(int(g) for g in grid))
    assert len(grids) > 1, "every image got the same grid: dynamic resolution is not exercised"


def test_sharding_changes_files_not_values(tmp_path: Path, qwen_tokenizer_dir: Path, tiny_checkpoint: Path) -> None:
    from safetensors.torch import load_file
    from transformers import Qwen3_5ForConditionalGeneration

    sharded = build_qwen3_5_checkpoint(tmp_path / "sharded", Qwen35Dims(), qwen_tokenizer_dir, max_shard_bytes=40 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (sharded / "model.safetensors").exists()
    merged = {}
    for name in files:
        merged.update(load_file(str(sharded / name)))
    single = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)
    _, info = Qwen3_5ForConditionalGeneration.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"]


def test_rejects_a_tokenizer_dir_without_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="build_qwen3_5_tokenizer"):
        build_qwen3_5_checkpoint(tmp_path / "out", Qwen35Dims(), tmp_path)
