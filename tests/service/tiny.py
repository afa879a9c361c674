"""A tiny text-only workspace laid out where the shipped ``demo`` profile looks for its files.

``build_tiny_workspace(home)`` writes, under ``home/demo``:

- ``model/``: :func:`tiny_models.write_tiny_llama`, a random BF16 ``LlamaForCausalLM`` (hidden 64,
  intermediate 128, 2 layers, 4 query and 2 KV heads) with a WordLevel tokenizer built there
  (no shared data, no Hub);
- ``cnn_dailymail/train.jsonl``: 16 rows in the cnn_dailymail schema (``article``, ``highlights``, ``id``);
- ``heldout.txt``: held-out text long enough for the demo profile's 4 windows of 128 tokens
  (both from :func:`tiny_models.write_corpus`).

With ``QUANTDAG_HOME=home`` the demo profile resolves to these files; the base is text-only, so
the flow skips the image-text branch and a whole run takes seconds of compute.
"""

from __future__ import annotations

from pathlib import Path

from tiny_models import write_corpus, write_tiny_llama


def build_tiny_workspace(home: Path, seed: int = 0) -> Path:
    """Write the tiny model, calibration rows and eval text under ``home/demo``; returns ``home``."""
    root = home / "demo"
    write_tiny_llama(root / "model", seed)
    write_corpus(root, rows=16, seed=seed)
    return home
