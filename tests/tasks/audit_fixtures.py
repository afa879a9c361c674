"""Checkpoints for tests/tasks/test_audit.py, and helpers that edit copies of them.

Two good checkpoints, each with its BF16 base:

- :func:`build_llama_export`: a real ModelOpt 0.47 NVFP4 export (max calibration on the CPU,
  ``export_hf_checkpoint``) of a tiny random ``LlamaForCausalLM``; single-file safetensors.
- :func:`build_qwen35_export`: a hand-written Qwen3.5 (``qwen3_5``) layout that exercises what a
  tiny Llama cannot: Gated DeltaNet projections (``in_proj_qkv``/``in_proj_z``/``in_proj_b``/
  ``in_proj_a``, ``conv1d``), a vision tower, an MTP head, a processor, sharded safetensors.

:func:`build_modelopt_qwen35_export` is a real ModelOpt export of a tiny random Qwen3.5 VLM, used
once to check that the rules accept what ModelOpt 0.47 writes for that architecture.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN = 64
LM = "model.language_model"
QWEN_EXCLUDES = [
    "lm_head",
    "model.visual*",
    f"{LM}.embed_tokens",
    "*linear_attn.conv1d*",
    "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*",
    "mtp.*",
]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
          "up_proj": "gate_up", "in_proj_qkv": "qkvz", "in_proj_z": "qkvz"}


def save_tokenizer(directory: Path, *, vlm: bool = False) -> None:
    """Save a tiny word-level tokenizer with a chat template (and a Qwen3-VL processor if vlm)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab = {token: i for i, token in enumerate([*special, "hello", "user", "assistant"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=special[2:],
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    if not vlm:
        tokenizer.save_pretrained(directory)
        return
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl import Qwen3VLProcessor, Qwen3VLVideoProcessor

    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(), chat_template=_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)


def build_llama_export(root: Path, *, kv_cache: str = "fp8_cast") -> tuple[Path, Path]:
    """Quantize a tiny random Llama with ModelOpt (NVFP4 W4A4 + FP8 KV) and export it.

    Args:
        root: empty directory; ``base/`` and ``export/`` are created in it.
        kv_cache: ``fp8_cast`` (constant amax 448, the recipe) or ``calibrated`` (max of K/V).

    Returns:
        ``(export_dir, base_dir)``.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    base, export = root / "base", root / "export"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(base)
    save_tokenizer(base)
    recipe = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    kv_cfg: dict[str, Any] = {"num_bits": (4, 3), "axis": None}
    if kv_cache == "fp8_cast":
        kv_cfg["use_constant_amax"] = True
    recipe["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": kv_cfg})

    def forward_loop(quantized: torch.nn.Module) -> None:
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            quantized(torch.randint(0, 256, (2, 16), generator=generator))

    with torch.no_grad():
        mtq.quantize(model, recipe, forward_loop)
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=export)
    save_tokenizer(export)
    return export, base


def build_modelopt_qwen35_export(root: Path) -> tuple[Path, Path]:
    """Quantize a tiny random ``Qwen3_5ForConditionalGeneration`` with ModelOpt and export it.

    Three Gated DeltaNet layers, one full-attention layer, a one-block vision tower; the base
    gets three ``mtp.*`` tensors in a second shard, passed to the export through
    ``extra_state_dict`` as the export step does. The vision quantizers are disabled with an
    8-bit format: ModelOpt's quantized Conv3d takes a CUDA-only path whenever its (even disabled)
    quantizers are NVFP4-typed.

    Returns:
        ``(export_dir, base_dir)``.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    base, export = root / "base", root / "export"
    torch.manual_seed(0)
    text = {"hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": 4,
            "vocab_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"]}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": HIDDEN}
    config = Qwen3_5Config(text_config=text, vision_config=vision,
                           architectures=["Qwen3_5ForConditionalGeneration"])
    model = Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16).eval()
    model.save_pretrained(base)
    save_tokenizer(base, vlm=True)
    generator = torch.Generator().manual_seed(2)
    mtp = {name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in (
        ("mtp.fc.weight", (HIDDEN, 2 * HIDDEN)), ("mtp.norm.weight", (HIDDEN,)),
        ("mtp.layers.0.mlp.gate_proj.weight", (128, HIDDEN)))}
    tensors, assignment = read_tensors(base)
    assignment = assignment or dict.fromkeys(tensors, "model.safetensors")
    assignment |= dict.fromkeys(mtp, "mtp.safetensors")
    write_tensors(base, tensors | mtp, assignment=assignment)
    recipe = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    recipe["quant_cfg"] += [
        {"quantizer_name": "*[kv]_bmm_quantizer",
         "cfg": {"num_bits": (4, 3), "axis": None, "use_constant_amax": True}},
        {"quantizer_name": "*visual*", "cfg": {"num_bits": 8, "axis": None}, "enable": False},
    ]

    def forward_loop(quantized: torch.nn.Module) -> None:
        for _ in range(2):
            quantized(input_ids=torch.randint(0, 200, (2, 16), generator=generator))

    with torch.no_grad():
        mtq.quantize(model, recipe, forward_loop)
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=export, extra_state_dict=mtp)
    save_tokenizer(export, vlm=True)
    return export, base


def _qwen_base_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        f"{LM}.embed_tokens.weight": (32, HIDDEN), f"{LM}.norm.weight": (HIDDEN,),
        "lm_head.weight": (32, HIDDEN),
        "model.visual.patch_embed.proj.weight": (16, 3, 2, 4, 4),
        "model.visual.pos_embed.weight": (16, 16),
        "model.visual.blocks.0.attn.qkv.weight": (48, 16),
        "model.visual.blocks.0.attn.qkv.bias": (48,),
        "model.visual.blocks.0.attn.proj.weight": (16, 16),
        "model.visual.merger.linear_fc1.weight": (HIDDEN, HIDDEN),
        "mtp.fc.weight": (HIDDEN, 2 * HIDDEN), "mtp.norm.weight": (HIDDEN,),
        "mtp.pre_fc_norm_embedding.weight": (HIDDEN,), "mtp.pre_fc_norm_hidden.weight": (HIDDEN,),
    }
    attention = {"self_attn.q_proj": (128, HIDDEN), "self_attn.k_proj": (32, HIDDEN),
                 "self_attn.v_proj": (32, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN)}
    mlp = {"mlp.gate_proj": (128, HIDDEN), "mlp.up_proj": (128, HIDDEN),
           "mlp.down_proj": (HIDDEN, 128)}
    delta_net = {"linear_attn.in_proj_qkv": (96, HIDDEN), "linear_attn.in_proj_z": (32, HIDDEN),
                 "linear_attn.in_proj_b": (4, HIDDEN), "linear_attn.in_proj_a": (4, HIDDEN),
                 "linear_attn.out_proj": (HIDDEN, 32)}
    layers = {f"{LM}.layers.0": delta_net, f"{LM}.layers.1": attention, "mtp.layers.0": attention}
    for prefix, linears in layers.items():
        shapes |= {f"{prefix}.{name}.weight": shape for name, shape in {**linears, **mlp}.items()}
        shapes[f"{prefix}.input_layernorm.weight"] = (HIDDEN,)
    shapes |= {f"{LM}.layers.0.linear_attn.conv1d.weight": (96, 1, 4),
               f"{LM}.layers.0.linear_attn.A_log": (4,), f"{LM}.layers.0.linear_attn.dt_bias": (4,)}
    return shapes


def fake_nvfp4(weight: torch.Tensor, scale_2: float, input_scale: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """NVFP4 tensors in the exported layout for a BF16 ``[out, in]`` weight (values random)."""
    out_features, in_features = weight.shape
    block_scales = torch.rand(out_features, in_features // 16, generator=generator) * 400 + 1
    return {
        "weight": torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8,
                                generator=generator),
        "weight_scale": block_scales.to(torch.float8_e4m3fn),
        "weight_scale_2": torch.tensor(scale_2, dtype=torch.float32),
        "input_scale": torch.tensor(input_scale, dtype=torch.float32),
    }


def build_qwen35_export(root: Path) -> tuple[Path, Path]:
    """Write a tiny Qwen3.5-layout base and its NVFP4 export, both as two safetensors shards.

    Language-model linears are "quantized" with random packed weights and scales; members of a
    fused group share ``weight_scale_2``/``input_scale``; everything matching
    :data:`QWEN_EXCLUDES` (vision, ``mtp.*``, ``in_proj_a/b``, ...) is copied bit for bit.

    Returns:
        ``(export_dir, base_dir)``.
    """
    from transformers import Qwen3_5Config

    base_dir, export_dir = root / "base", root / "export"
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator).to(torch.bfloat16)
            for name, shape in _qwen_base_shapes().items()}
    export: dict[str, torch.Tensor] = {}
    group_scales: dict[str, tuple[float, float]] = {}
    for name, tensor in base.items():
        module = name.removesuffix(".weight")
        excluded = any(fnmatch.fnmatchcase(module, p) for p in QWEN_EXCLUDES)
        if tensor.ndim != 2 or excluded or not name.endswith(".weight") or "embed" in module:
            export[name] = tensor.clone()
            continue
        parent, _, leaf = module.rpartition(".")
        group = f"{parent}.{_FUSED.get(leaf, leaf)}"
        scales = group_scales.setdefault(group, (1e-4 * (1 + len(group_scales)), 2e-3))
        export |= {f"{module}.{k}": v for k, v in fake_nvfp4(tensor, *scales, generator).items()}
    config = Qwen3_5Config(
        text_config={"hidden_size": HIDDEN, "num_hidden_layers": 2, "vocab_size": 32,
                     "layer_types": ["linear_attention", "full_attention"]},
        vision_config={"depth": 1, "hidden_size": 16, "out_hidden_size": HIDDEN},
        architectures=["Qwen3_5ForConditionalGeneration"],
    ).to_dict()
    for directory, tensors in ((base_dir, base), (export_dir, export)):
        directory.mkdir(parents=True)
        write_tensors(directory, tensors, shards=2)
        (directory / "config.json").write_text(json.dumps(config, indent=1))
        save_tokenizer(directory, vlm=True)
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    quantization = {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                    "exclude_modules": list(QWEN_EXCLUDES)}
    write_json(export_dir / "hf_quant_config.json",
               {"producer": {"name": "modelopt", "version": "0.47.0"},
                "quantization": quantization})
    config["quantization_config"] = {
        "ignore": list(QWEN_EXCLUDES), "quant_algo": "NVFP4", "quant_method": "modelopt",
        "kv_cache_scheme": {"dynamic": False, "num_bits": 8, "type": "float"},
    }
    write_json(export_dir / "config.json", config)
    return export_dir, base_dir


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=1))


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
                  assignment: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as ``model.safetensors`` or ``shards`` files plus an index.

    ``assignment`` (name -> file) keeps an existing layout; names it lacks go to the first file.
    """
    for old in [*directory.glob("*.safetensors"), directory / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    names = sorted(tensors)
    if shards == 1 and assignment is None:
        save_file({n: tensors[n].contiguous() for n in names}, directory / "model.safetensors",
                  metadata={"format": "pt"})
        return
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    if assignment is None:
        assignment = {name: files[i * shards // len(names)] for i, name in enumerate(names)}
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        by_file.setdefault(assignment.get(name, min(assignment.values())), {})[name] = tensors[name]
    for file, part in by_file.items():
        save_file({n: t.contiguous() for n, t in part.items()}, directory / file,
                  metadata={"format": "pt"})
    write_json(directory / "model.safetensors.index.json",
               {"metadata": {}, "weight_map": {n: f for f, part in by_file.items() for n in part}})


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """All tensors of a small checkpoint, and its name -> file map (None when single-file)."""
    index = directory / "model.safetensors.index.json"
    assignment = json.loads(index.read_text())["weight_map"] if index.exists() else None
    files = sorted(set(assignment.values())) if assignment else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(directory / file), framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, assignment


def edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``edit`` (in place on the name -> tensor dict) and rewrite, keeping the sharding."""
    tensors, assignment = read_tensors(directory)
    edit(tensors)
    write_tensors(directory, tensors, assignment=assignment)


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` in place to the JSON object in ``path`` and write it back."""
    data = json.loads(path.read_text())
    edit(data)
    write_json(path, data)


def edit_excludes(directory: Path, edit: Callable[[list[str]], list[str]]) -> None:
    """Replace the exclude list in both ``hf_quant_config.json`` and ``config.json``."""
    def hf(data: dict[str, Any]) -> None:
        data["quantization"]["exclude_modules"] = edit(data["quantization"]["exclude_modules"])

    def mirror(data: dict[str, Any]) -> None:
        data["quantization_config"]["ignore"] = edit(data["quantization_config"]["ignore"])

    edit_json(directory / "hf_quant_config.json", hf)
    edit_json(directory / "config.json", mirror)


def dequantize_to_bf16(tensors: dict[str, torch.Tensor], module: str) -> None:
    """Replace an NVFP4 module's tensors by a BF16 ``[out, in]`` weight (values random)."""
    packed = tensors.pop(f"{module}.weight")
    for leaf in ("weight_scale", "weight_scale_2", "input_scale"):
        tensors.pop(f"{module}.{leaf}")
    shape = (packed.shape[0], 2 * packed.shape[1])
    tensors[f"{module}.weight"] = torch.randn(shape).to(torch.bfloat16)
