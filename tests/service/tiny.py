"""A tiny text-only workspace laid out where the shipped ``demo`` profile looks for its files.

``build_tiny_workspace(home)`` writes, under ``home/demo``:

- ``model/``: a random BF16 ``LlamaForCausalLM`` (hidden 64, intermediate 128, 2 layers, 4 query
  and 2 KV heads) with a WordLevel tokenizer built here (no shared data, no Hub);
- ``cnn_dailymail/train.jsonl``: 16 rows in the cnn_dailymail schema (``article``, ``highlights``, ``id``);
- ``heldout.txt``: held-out text long enough for the demo profile's 4 windows of 128 tokens.

With ``QUANTDAG_HOME=home`` the demo profile resolves to these files; the base is text-only, so
the flow skips the image-text branch and a whole run takes seconds of compute.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [f"w{i:03d}" for i in range(240)]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS + [".", ","])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=4096)
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(out)


def _prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + ("." if i % 12 == 11 else "") for i in range(words))


def build_tiny_workspace(home: Path, seed: int = 0) -> Path:
    """Write the tiny model, calibration rows and eval text under ``home/demo``; returns ``home``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = home / "demo"
    model_dir = root / "model"
    _tokenizer(model_dir)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(SPECIAL) + len(WORDS) + 2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    rng = random.Random(seed)
    rows = root / "cnn_dailymail" / "train.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    with open(rows, "w", encoding="utf-8") as handle:
        for i in range(16):
            handle.write(json.dumps({"article": _prose(rng, 200), "highlights": _prose(rng, 20), "id": f"row{i}"}) + "\n")
    (root / "heldout.txt").write_text(_prose(random.Random(seed + 1), 1200) + "\n")
    return home
