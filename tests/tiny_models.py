"""Small text-only bases and corpora for tests that need a real model but not a VLM."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the market city council report said on monday that river bank new plan school water power road "
         "year people police game team season film music court health price rate growth storm").split()


def write_tokenizer(out_dir: Path) -> None:
    """A whitespace WordLevel fast tokenizer over :data:`WORDS` (ids 0-3 are special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(out_dir)


def build_tiny_llama(out_dir: Path, seed: int = 0, zero_up_proj_layer: int | None = None) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (hidden 64, intermediate 128) in BF16 with a tokenizer.

    Args:
        zero_up_proj_layer: if set, that layer's ``mlp.up_proj`` weight is all zeros, so its
            ``down_proj`` only ever sees zero inputs (amax 0).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if zero_up_proj_layer is not None:
        with torch.no_grad():
            model.model.layers[zero_up_proj_layer].mlp.up_proj.weight.zero_()
    model.save_pretrained(out_dir)
    write_tokenizer(out_dir)
    return out_dir


def write_corpus(root: Path, rows: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """A cnn_dailymail-schema ``train.jsonl`` and a held-out ``heldout.txt`` over :data:`WORDS`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows_path, eval_path = root / "train.jsonl", root / "heldout.txt"
    with open(rows_path, "w") as handle:
        for i in range(rows):
            article = " ".join(rng.choice(WORDS) for _ in range(80))
            handle.write(json.dumps({"id": f"row{i}", "article": article, "highlights": article[:40]}) + "\n")
    eval_path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(20)))
    return rows_path, eval_path
