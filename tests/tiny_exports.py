"""Tiny NVFP4 exports made with ModelOpt on the CPU, for tests and benchmarks.

Each builder makes a deterministic random BF16 model, calibrates it on random token ids with the
project's default recipe (:func:`quantdag.calibration.recipe.build_quant_config` of ``RecipeSpec()``: NVFP4
W4A4, FP8 "fp8_cast" KV cache, the reference exclusions; max calibration runs on the CPU), and
writes it with ``modelopt.torch.export.export_hf_checkpoint``. The matching ``build_*`` function
rebuilds the same BF16 model, since export overwrites the in-memory weights with packed ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 256
"""Vocabulary size of the tiny models (token ids 0..255)."""


def calibration_ids(
    seed: int = 0, batches: int = 4, batch_size: int = 2, length: int = 32
) -> list[torch.Tensor]:
    """Random token-id batches for calibration.

    Args:
        seed: generator seed.
        batches: number of batches.
        batch_size: rows a batch.
        length: tokens a row.

    Returns:
        List of ``int64 [batch_size, length]`` tensors with ids in ``[0, TINY_VOCAB)``.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (batch_size, length)
    return [torch.randint(0, TINY_VOCAB, shape, generator=generator) for _ in range(batches)]


def _quantize_and_export(model: torch.nn.Module, out_dir: str | Path, seed: int) -> Path:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from conf.schema import RecipeSpec
    from quantdag.calibration.recipe import build_quant_config

    batches = calibration_ids(seed)

    def forward_loop(calibrated: torch.nn.Module) -> None:
        with torch.no_grad():
            for input_ids in batches:
                calibrated(input_ids=input_ids)

    mtq.quantize(model, build_quant_config(RecipeSpec()), forward_loop)
    out = Path(out_dir)
    export_hf_checkpoint(model, export_dir=out)
    return out


def build_tiny_llama(seed: int = 0, *, tie_word_embeddings: bool = False) -> torch.nn.Module:
    """The BF16 ``LlamaForCausalLM`` that :func:`export_tiny_llama_nvfp4` quantizes.

    Hidden 64, intermediate 128, 2 layers, 4 query and 2 KV heads of 16, vocabulary 256: every
    linear's ``in_features`` is a multiple of 16.

    Args:
        seed: initialisation seed; the same seed gives the same weights.
        tie_word_embeddings: share ``lm_head`` with the embeddings, as SmolLM2 does.

    Returns:
        The model in eval mode, built in ``bfloat16`` as ``from_pretrained(dtype=torch.bfloat16)``
        would load it (rotary ``inv_freq`` stays float32), ``config.architectures`` set (export
        needs it).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=128,
        architectures=["LlamaForCausalLM"],
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def export_tiny_llama_nvfp4(
    out_dir: str | Path, seed: int = 0, *, tie_word_embeddings: bool = False
) -> Path:
    """Quantize :func:`build_tiny_llama` with ModelOpt (NVFP4 W4A4, FP8 KV) and export it.

    Takes about a second after ModelOpt is imported (import: about 6 s on 2 cores).

    Args:
        out_dir: directory to write (``config.json``, ``hf_quant_config.json``,
            ``model.safetensors``, ``generation_config.json``).
        seed: model and calibration seed.
        tie_word_embeddings: tie ``lm_head`` to the embeddings; the export then stores only
            ``model.embed_tokens.weight``.

    Returns:
        ``out_dir`` as a Path. 14 linears are NVFP4; ``lm_head`` and ``model.embed_tokens`` stay
        BF16.
    """
    model = build_tiny_llama(seed, tie_word_embeddings=tie_word_embeddings)
    return _quantize_and_export(model, out_dir, seed)


def build_tiny_qwen3_5(seed: int = 0) -> torch.nn.Module:
    """A BF16 ``Qwen3_5ForConditionalGeneration`` small enough for CPU tests.

    Language model: hidden 64, intermediate 128, 4 layers (3 Gated-DeltaNet linear attention, 1
    full attention), vocabulary 256. Vision tower: 2 blocks of width 32, merged to 64.

    Args:
        seed: initialisation seed.

    Returns:
        The model in eval mode, built in ``bfloat16``, ``config.architectures`` set.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        max_position_embeddings=256,
    )
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        architectures=["Qwen3_5ForConditionalGeneration"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def export_tiny_qwen3_5_nvfp4(out_dir: str | Path, seed: int = 0) -> Path:
    """Quantize :func:`build_tiny_qwen3_5` (text-only calibration) and export it, plus MTP tensors.

    A real Qwen3.5 checkpoint carries a multi-token-prediction head (``mtp.*``) that the
    transformers class does not have; the export task copies it over unchanged. This adds three
    random BF16 ``mtp.*`` tensors to ``model.safetensors`` to stand in for them.

    Args:
        out_dir: directory to write.
        seed: model and calibration seed.

    Returns:
        ``out_dir`` as a Path. 25 language-model linears are NVFP4; ``lm_head``, embeddings,
        ``in_proj_a``/``in_proj_b``, ``conv1d`` and ``model.visual.*`` stay BF16.
    """
    from safetensors.torch import load_file, save_file

    out = _quantize_and_export(build_tiny_qwen3_5(seed), out_dir, seed)
    path = out / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed + 2)
    for name, shape in {
        "mtp.fc.weight": (64, 128),
        "mtp.layers.0.mlp.down_proj.weight": (64, 128),
        "mtp.norm.weight": (64,),
    }.items():
        tensors[name] = torch.randn(shape, generator=generator).to(torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    return out
