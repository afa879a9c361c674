"""The embedded demo's workspace: tiny Qwen3.5 VLM + generated corpora in the real layouts.

``<root>/model`` (checkpoint with tokenizer, processor and ``mtp.*`` tensors),
``<root>/nemotron-vlm-mirror`` (Nemotron-VLM-Dataset-v2 layout), ``<root>/cnn_dailymail/train.jsonl``
(cnn_dailymail schema) and ``<root>/heldout.txt`` (evaluation text). Built once; a ``.complete``
marker is written last, so an interrupted build is redone rather than used.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from quantdag.demo.corpus import write_eval_text, write_image_text_mirror, write_text_mirror
from quantdag.demo.dims import Qwen35Dims
from quantdag.demo.tiny_model import build_qwen3_5_checkpoint
from quantdag.demo.tokenizer import build_qwen3_5_tokenizer

MARKER = ".complete"


def build_demo_workspace(root: str | Path, rebuild: bool = False, seed: int = 0) -> Path:
    """Create (or reuse) the demo workspace under ``root``; returns ``root``.

    Args:
        root: directory to fill (created if missing).
        rebuild: delete and rebuild even if a complete workspace exists.
        seed: seeds weights and corpora.
    """
    root = Path(root).resolve()
    if (root / MARKER).is_file() and not rebuild:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = build_qwen3_5_tokenizer(Path(tmp) / "tokenizer")
        build_qwen3_5_checkpoint(root / "model", Qwen35Dims(), tokenizer_dir, seed=seed)
    write_image_text_mirror(root / "nemotron-vlm-mirror", rows_per_subset=4, seed=seed)
    write_text_mirror(root / "cnn_dailymail" / "train.jsonl", n=24, seed=seed)
    write_eval_text(root / "heldout.txt", n_paragraphs=40, seed=seed)
    (root / MARKER).write_text("ok\n")
    return root
