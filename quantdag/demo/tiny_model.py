"""Synthetic `Qwen3_5ForConditionalGeneration` checkpoints: a tiny demo model or real-width slices.

`build_qwen3_5_checkpoint` writes the checkpoint that `quantdag.demo.dims.Qwen35Dims` describes
(its defaults: the tiny demo model; `Qwen35Dims.qwen3_6_27b`: the release's widths with fewer
layers): a directory that `Qwen3_5ForConditionalGeneration` and `AutoModelForImageTextToText`
load, that `AutoProcessor` turns into a `Qwen3VLProcessor`, and whose safetensors also hold the
one MTP (multi-token prediction) layer of the release under `mtp.*`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantdag.demo.dims import Qwen35Dims, qwen3_5_config
from quantdag.demo.processor_files import write_generation_config, write_processor_files
from quantdag.demo.weights import model_specs, mtp_specs, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def build_qwen3_5_checkpoint(
    out_dir: str | Path,
    dims: Qwen35Dims,
    tokenizer_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 4 * 2**30,
    write_weights: Callable[[Path, list[Any], int, int], Any] | None = None,
) -> Path:
    """Write a random-weight Qwen3.5 VLM checkpoint, complete enough to quantize and serve.

    Files: `config.json`, `generation_config.json`, `model.safetensors` (or
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` beyond `max_shard_bytes`),
    the tokenizer files copied from `tokenizer_dir`, and the processor files
    (`preprocessor_config.json`, `video_preprocessor_config.json`, `processor_config.json`).
    Tensors are generated one shard at a time, never the whole model; the same `seed` gives the
    same bytes whatever the sharding. Init: Linear/Conv/Embedding weights N(0, 0.02); biases 0;
    norms at unit effective scale (`Qwen3_5RMSNorm` computes x * (1 + w), so its w is 0;
    the gated and vision norms are plain, w = 1); `A_log` = log U(1, 16); `dt_bias` = 1.
    The safetensors also hold `mtp.*` (see `quantdag.demo.weights.mtp_specs`).

    Args:
        out_dir: Directory to write; created if missing.
        dims: Model widths, e.g. `Qwen35Dims()` (about 136 MB in bf16, 98% of it the two
            248,320-row embedding matrices) or `Qwen35Dims.qwen3_6_27b(4)` (about 10 GB;
            7.7 GB with one layer).
        tokenizer_dir: Output of `quantdag.demo.tokenizer.build_qwen3_5_tokenizer`.
        seed: Seeds every tensor (each from its own name and this seed).
        dtype: Parameter dtype (the release's is `torch.bfloat16`).
        max_shard_bytes: Largest safetensors file before the checkpoint is split; also bounds the
            memory the writer holds (about one shard).
        write_weights: ``(out_dir, specs, seed, max_shard_bytes)`` writes the safetensors (and their
            index); default :func:`quantdag.demo.weights.write_safetensors` in ``dtype``. The
            benchmarks pass a faster writer for 27B-sized checkpoints.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: If `tokenizer_dir` lacks a tokenizer file, `out_dir` is a file, or
            `max_shard_bytes` is not positive.
    """
    out, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"tokenizer_dir={tokenizer_dir} lacks {missing}; build it with build_qwen3_5_tokenizer(tokenizer_dir)"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={out} is a file; pass a directory path")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: pass a positive byte count")
    out.mkdir(parents=True, exist_ok=True)

    config = qwen3_5_config(dims, dtype)
    specs = model_specs(config) + mtp_specs(config)
    if write_weights is None:
        write_safetensors(out, specs, seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes)
    else:
        write_weights(out, specs, seed, max_shard_bytes)
    config.save_pretrained(out)
    write_generation_config(out)
    write_processor_files(out, dims)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out
