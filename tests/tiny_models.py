"""Tiny random BF16 bases and a matching corpus for tests: one builder per model kind, CPU only.

- :func:`build_tiny_llama` and :func:`build_tiny_qwen3_5` make the models in memory (the same
  seed gives the same weights); :mod:`tiny_exports` quantizes and exports them with ModelOpt.
- :func:`write_tiny_llama` saves the Llama with a tokenizer (:func:`write_tokenizer`), as a base
  directory that ``BaseModelSpec(local_dir=...)`` resolves.
- :func:`write_corpus` writes calibration rows in the ``abisee/cnn_dailymail`` schema and held-out
  text, both over the tokenizer's words and laid out as in the demo workspace.

Nothing is downloaded: no Hub, no shared data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TINY_VOCAB = 256
"""Vocabulary size of the tiny models (token ids 0..255); the tokenizer's 37 tokens are the lowest ids."""

SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
"""Special tokens of :func:`write_tokenizer`, ids 0-3 (``unk``, ``bos``, ``eos``, ``pad``)."""

WORDS = ("the market city council report said on monday that river bank new plan school water power road "
         "year people police game team season film music court health price rate growth storm").split()
"""The tokenizer's words (ids 4 onwards, then ``.`` and ``,``); the corpus uses only these."""


def build_tiny_llama(seed: int = 0, *, tie_word_embeddings: bool = False,
                     zero_up_proj_layer: int | None = None) -> torch.nn.Module:
    """A random BF16 ``LlamaForCausalLM`` small enough for CPU tests.

    Hidden 64, intermediate 128, 2 layers, 4 query and 2 KV heads of 16, vocabulary
    :data:`TINY_VOCAB`, 512 positions, token ids of :data:`SPECIAL`: every linear's ``in_features``
    is a multiple of 16 (NVFP4's block).

    Args:
        seed: initialisation seed; the same seed gives the same weights (the global RNG is left
            as it was).
        tie_word_embeddings: share ``lm_head`` with the embeddings, as SmolLM2 does.
        zero_up_proj_layer: if set, that layer's ``mlp.up_proj`` weight is all zeros, so its
            ``down_proj`` only ever sees zero inputs (amax 0).

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
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        architectures=["LlamaForCausalLM"],
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    if zero_up_proj_layer is not None:
        with torch.no_grad():
            model.model.layers[zero_up_proj_layer].mlp.up_proj.weight.zero_()
    return model.eval()


def build_tiny_qwen3_5(seed: int = 0) -> torch.nn.Module:
    """A random BF16 ``Qwen3_5ForConditionalGeneration`` small enough for CPU tests.

    Language model: hidden 64, intermediate 128, 4 layers (3 Gated-DeltaNet linear attention, 1
    full attention), vocabulary :data:`TINY_VOCAB`. Vision tower: 2 blocks of width 32, merged to
    64. (The demo's real-vocabulary Qwen3.5 is ``quantdag.demo.tiny_model``.)

    Args:
        seed: initialisation seed; the same seed gives the same weights.

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


def write_tokenizer(out_dir: Path) -> Path:
    """Save a WordLevel fast tokenizer over :data:`SPECIAL`, :data:`WORDS`, ``.`` and ``,``.

    Words and punctuation split on whitespace and word boundaries; anything else is ``<unk>``. It
    has a chat template (the export audit renders one) and a 4096-token ``model_max_length``.

    Returns:
        ``out_dir``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS, ".", ","])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096)
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out_dir)
    return out_dir


def write_tiny_llama(out_dir: Path, seed: int = 0, *, zero_up_proj_layer: int | None = None) -> Path:
    """Save :func:`build_tiny_llama` (BF16 safetensors) with :func:`write_tokenizer` as a base directory.

    Args:
        out_dir: directory to write (created if missing).
        seed: initialisation seed.
        zero_up_proj_layer: passed to :func:`build_tiny_llama`.

    Returns:
        ``out_dir``.
    """
    build_tiny_llama(seed, zero_up_proj_layer=zero_up_proj_layer).save_pretrained(out_dir)
    return write_tokenizer(out_dir)


def _prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + ("." if i % 12 == 11 else "") for i in range(words))


def write_corpus(root: Path, rows: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """Write calibration rows and held-out text over :data:`WORDS`, laid out as in the demo workspace.

    Args:
        root: directory to fill (created if missing).
        rows: rows of ``cnn_dailymail/train.jsonl``: ``article`` (200 words), ``highlights``
            (20 words) and ``id`` (``row<i>``).
        seed: seeds the text.

    Returns:
        ``(root / "cnn_dailymail" / "train.jsonl", root / "heldout.txt")``; the held-out text is
        1,200 words (about 1,300 tokens: the demo profile's 4 windows of 128 fit).
    """
    rows_path, eval_path = root / "cnn_dailymail" / "train.jsonl", root / "heldout.txt"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(rows_path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            row = {"article": _prose(rng, 200), "highlights": _prose(rng, 20), "id": f"row{i}"}
            handle.write(json.dumps(row) + "\n")
    eval_path.write_text(_prose(random.Random(seed + 1), 1200) + "\n")
    return rows_path, eval_path
