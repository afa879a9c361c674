"""Session fixtures for the demo inputs: the Qwen3.5 tokenizer, the tiny checkpoint, a small mirror."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantdag.demo.tokenizer import build_qwen3_5_tokenizer

    return build_qwen3_5_tokenizer(tmp_path_factory.mktemp("qwen3_5_tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: Path):
    """The built tokenizer loaded the way users load it (`AutoTokenizer`), once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:
    from quantdag.demo.dims import Qwen35Dims
    from quantdag.demo.tiny_model import build_qwen3_5_checkpoint

    return build_qwen3_5_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_5"), Qwen35Dims(), qwen_tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint: Path):
    """`AutoProcessor` of the tiny checkpoint, loaded once (the 248k-token tokenizer takes seconds)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def mirror_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four rows per subset in shards of three (so every subset has two shards)."""
    from quantdag.demo.corpus import write_image_text_mirror

    return write_image_text_mirror(tmp_path_factory.mktemp("vlm_mirror"), rows_per_subset=4, seed=0, rows_per_shard=3)
