"""llm-compressor's NVFP4 one-shot on a BF16 Hugging Face directory (run in llm-compressor's venv).

``benchmarks/peer_smollm2.py`` runs this file with the interpreter of a separate virtual
environment, because llm-compressor 0.14 needs transformers >= 5.15 and torch <= 2.14.0 while the
project pins transformers < 5.15 and torch 2.14.1. It imports nothing from the project.

What it does:

1. loads ``--model`` (a ``save_pretrained`` directory, BF16) with ``AutoModelForCausalLM``;
2. builds a ``datasets.Dataset`` from ``--calibration``: a JSON list of token-id lists (int, one per
   calibration row, already cut to the calibration length), so llm-compressor skips its own
   tokenization and sees exactly the tokens quantdag calibrated on; ``attention_mask`` is all ones;
3. ``oneshot`` with ``QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])``,
   batch size 1, no shuffling, every row used;
4. ``save_pretrained(--output, save_compressed=True)`` (compressed-tensors format
   ``nvfp4-pack-quantized``) plus the tokenizer;
5. writes ``--report``: JSON with the seconds of each phase and the library versions.

Usage::

    <venv>/bin/python benchmarks/peer_llmcompressor_job.py --model DIR --calibration ids.json \\
        --output OUT --report report.json
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="BF16 Hugging Face model directory")
    parser.add_argument("--calibration", required=True, type=Path, help="JSON list of token-id lists")
    parser.add_argument("--output", required=True, type=Path, help="directory for the compressed checkpoint")
    parser.add_argument("--report", required=True, type=Path, help="JSON file for timings and versions")
    return parser.parse_args()


def _calibration_dataset(path: Path):
    """``datasets.Dataset`` with ``input_ids`` and ``attention_mask`` (lists of int) per row.

    Raises:
        ValueError: the file is not a non-empty list of non-empty integer lists.
    """
    from datasets import Dataset

    rows = json.loads(path.read_text())
    bad = [i for i, row in enumerate(rows) if not row or not all(isinstance(t, int) for t in row)]
    if not rows or bad:
        raise ValueError(f"{path}: expected a non-empty list of non-empty token-id lists; bad rows {bad[:10]}")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]})


def main() -> None:
    """Run the one-shot quantization described in the module docstring."""
    args = _parse_args()
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = _calibration_dataset(args.calibration)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    recipe = QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        processor=tokenizer,
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds["oneshot"] = time.perf_counter() - start

    start = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, save_compressed=True)
    tokenizer.save_pretrained(args.output)
    seconds["save"] = time.perf_counter() - start

    report = {
        "seconds": seconds,
        "calibration_rows": len(dataset),
        "calibration_tokens": sum(len(row) for row in dataset["input_ids"]),
        "versions": {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
    }
    args.report.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
