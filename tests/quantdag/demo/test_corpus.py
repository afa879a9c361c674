"""The offline dataset mirrors: layout, determinism, answers that follow from the drawn data."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest

from quantdag.demo import corpus, text

SUBSETS = ("sparsetables", "plotqa_cot", "wiki_en")


def _rows(root: Path, subset: str) -> list[dict]:
    return [json.loads(line) for line in (root / subset / f"{subset}.jsonl").read_text().splitlines()]


def _members(root: Path, subset: str) -> dict[str, str]:
    """Image file name -> shard file name, read with tarfile directly."""
    found = {}
    for shard in sorted((root / subset / "media").glob("shard_*.tar")):
        with tarfile.open(shard) as archive:
            for name in archive.getnames():
                assert name not in found, f"{name} is in two shards"
                found[name] = shard.name
    return found


@pytest.mark.parametrize("subset", SUBSETS)
def test_mirror_layout_matches_nemotron_vlm_v2(mirror_root: Path, subset: str) -> None:
    rows = _rows(mirror_root, subset)
    members = _members(mirror_root, subset)
    assert len(rows) == 4
    assert sorted(set(members.values())) == ["shard_000000.tar", "shard_000001.tar"]
    for row in rows:
        assert set(row) == {"id", "messages"}
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert [item["type"] for item in user["content"]] == ["image", "text"]
        assert user["content"][0]["image"] in members and user["content"][0]["image"].endswith(".png")
        assert user["content"][1]["text"].endswith("?") or "?" in user["content"][1]["text"]
        assert assistant["content"][0]["type"] == "text" and assistant["content"][0]["text"]
        image = corpus.load_mirror_image(mirror_root, subset, user["content"][0]["image"])
        assert image.mode == "RGB" and all(200 <= side <= 900 for side in image.size)
    assert len({row["id"] for row in rows}) == len(rows)


def test_sizes_vary(tmp_path: Path) -> None:
    root = corpus.write_image_text_mirror(tmp_path, subsets=["wiki_en"], rows_per_subset=12, seed=1)
    names = [r["messages"][0]["content"][0]["image"] for r in _rows(root, "wiki_en")]
    sizes = {corpus.load_mirror_image(root, "wiki_en", name).size for name in names}
    assert len(sizes) == 12
    widths = sorted(w for w, _ in sizes)
    assert widths[-1] - widths[0] > 300, f"widths barely vary: {widths}"


def test_mirror_is_deterministic(tmp_path: Path) -> None:
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = snapshot(corpus.write_image_text_mirror(tmp_path / "a", rows_per_subset=3, seed=7, rows_per_shard=2))
    b = snapshot(corpus.write_image_text_mirror(tmp_path / "b", rows_per_subset=3, seed=7, rows_per_shard=2))
    c = snapshot(corpus.write_image_text_mirror(tmp_path / "c", rows_per_subset=3, seed=8, rows_per_shard=2))
    assert a == b
    assert a != c
    assert len(a) == 3 * (1 + 2)  # per subset: the jsonl and two shards


def test_chart_answers_follow_from_the_values(tmp_path: Path) -> None:
    root = corpus.write_image_text_mirror(tmp_path, subsets=["plotqa_cot"], rows_per_subset=40, seed=2)
    kinds = set()
    for row in _rows(root, "plotqa_cot"):
        question = row["messages"][0]["content"][1]["text"]
        answer = row["messages"][1]["content"][0]["text"]
        pairs = dict(re.findall(r"(\d{4}): (\d+)", answer.split(".")[0]))
        values = {year: int(v) for year, v in pairs.items()}
        final = answer.rsplit("So the answer is ", 1)[1].rstrip(".")
        if question.startswith("In which year"):
            kinds.add("argmax")
            assert final == max(values, key=values.get)
        else:
            kinds.add("range")
            assert int(final) == max(values.values()) - min(values.values())
    assert kinds == {"argmax", "range"}


def test_table_and_page_answers_are_grounded(tmp_path: Path) -> None:
    root = corpus.write_image_text_mirror(tmp_path, subsets=["sparsetables", "wiki_en"], rows_per_subset=30, seed=4)
    for row in _rows(root, "sparsetables"):
        question, answer = row["messages"][0]["content"][1]["text"], row["messages"][1]["content"][0]["text"]
        if question.startswith("Which city"):
            assert answer in text.CITIES
        else:
            assert answer.isdigit() and int(answer) >= 10, (question, answer)
    kinds = {kind for kind, _, _ in text.PAGE_KINDS}
    for row in _rows(root, "wiki_en"):
        question, answer = row["messages"][0]["content"][1]["text"], row["messages"][1]["content"][0]["text"]
        if question.startswith("What kind"):
            assert answer.removeprefix("A ").rstrip(".") in kinds
        else:
            assert answer and answer[0].isupper()


def test_text_mirror_schema_and_variety(tmp_path: Path) -> None:
    path = corpus.write_text_mirror(tmp_path / "cnn.jsonl", 20, seed=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 20
    for record in records:
        assert set(record) == {"article", "highlights", "id"}
        assert re.fullmatch(r"[0-9a-f]{40}", record["id"])
        assert 200 <= len(record["article"].split()) <= 600
        assert len(record["highlights"].splitlines()) == 3
    assert len({r["id"] for r in records}) == 20
    vocabulary = {w.strip('.,"$').lower() for r in records for w in r["article"].split()}
    assert len(vocabulary) > 250, f"only {len(vocabulary)} distinct words"
    assert corpus.write_text_mirror(tmp_path / "again.jsonl", 20, seed=0).read_bytes() == path.read_bytes()


def test_eval_text_is_held_out(tmp_path: Path) -> None:
    eval_text = corpus.write_eval_text(tmp_path / "eval.txt", 60, seed=0).read_text()
    lines = eval_text.splitlines()
    paragraphs = [line for line in lines if not line.startswith(" = ")]
    assert len(paragraphs) == 60 and lines[0].startswith(" = ") and lines[0].endswith(" = ")
    sentences = {s.strip() for p in paragraphs for s in p.split(" . ") if len(s.split()) > 4}
    news = corpus.write_text_mirror(tmp_path / "cnn.jsonl", 50, seed=0).read_text()
    mirror = corpus.write_image_text_mirror(tmp_path / "vlm", subsets=["wiki_en"], rows_per_subset=20, seed=0)
    answers = (mirror / "wiki_en" / "wiki_en.jsonl").read_text()
    leaked = [s for s in sentences if s in news or s in answers]
    assert not leaked, leaked[:3]
    page_subjects = [kind for kind, _, _ in text.PAGE_KINDS if f" {kind} " in eval_text]
    assert not page_subjects, f"evaluation text shares subjects with the rendered pages: {page_subjects}"
    assert corpus.write_eval_text(tmp_path / "again.txt", 60, seed=0).read_text() == eval_text


def test_bad_arguments_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown \\['docvqa'\\]"):
        corpus.write_image_text_mirror(tmp_path, subsets=["docvqa"])
    with pytest.raises(ValueError, match="rows_per_subset=0"):
        corpus.write_image_text_mirror(tmp_path, rows_per_subset=0)
    with pytest.raises(ValueError, match="n=0"):
        corpus.write_text_mirror(tmp_path / "x.jsonl", 0)
    with pytest.raises(ValueError, match="n_paragraphs=-1"):
        corpus.write_eval_text(tmp_path / "x.txt", -1)
    with pytest.raises(ValueError, match="none of the"):
        corpus.load_mirror_image(tmp_path, "wiki_en", "missing.png")
