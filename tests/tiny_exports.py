"""Tiny NVFP4 exports made with ModelOpt on the CPU, for tests.

Each exporter takes the deterministic random BF16 model of :mod:`tiny_models`, calibrates it on
random token ids with the project's default recipe (:func:`quantdag.calibration.recipe.build_quant_config`
of ``RecipeSpec()``: NVFP4 W4A4, FP8 "fp8_cast" KV cache, the reference exclusions; max
calibration runs on the CPU), and writes it with ``modelopt.torch.export.export_hf_checkpoint``.
The matching :mod:`tiny_models` builder rebuilds the same BF16 model, since export overwrites the
in-memory weights with packed ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import TINY_VOCAB, build_tiny_llama, build_tiny_qwen3_5


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
