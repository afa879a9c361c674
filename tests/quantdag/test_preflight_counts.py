"""Everything countable is counted by the preflight, before the first model load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conf import load_profile
from fault_rows import fault_row
from quantdag.demo.corpus import write_image_text_mirror, write_text_mirror
from quantdag.runtime.preflight import PreflightError, countable_shortfalls, preflight

SUBSETS = ["sparsetables", "plotqa_cot", "wiki_en"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    write_image_text_mirror(root / "mirror", SUBSETS, rows_per_subset=3)
    write_text_mirror(root / "text.jsonl", 5)
    (root / "eval.txt").write_text("held-out text\n")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "vision_config": {}}))
    return root


def _profile(inputs: Path, tmp_path: Path, **overrides):
    base = {"base": {"local_dir": str(inputs / "model")},
            "image_text": {"path": str(inputs / "mirror"), "subsets": SUBSETS, "num_samples": 6},
            "text": {"path": str(inputs / "text.jsonl"), "num_samples": 4},
            "eval": {"path": str(inputs / "eval.txt"), "image_text_samples": 3},
            "artifact_store": str(tmp_path / "store"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    for key, value in overrides.items():
        base[key] = {**base[key], **value}
    return load_profile("demo", base)


def test_enough_rows_pass(inputs: Path, tmp_path: Path) -> None:
    assert countable_shortfalls(_profile(inputs, tmp_path)) == []  # 2 + 1 of 3 rows per subset


def test_too_few_held_out_rows_fail_the_preflight_naming_each_subset(inputs: Path, tmp_path: Path, prefect_api: str,
                                                                   request) -> None:
    row = fault_row(request, "too few held-out image-text rows",
                    "the preflight fails in about a second, before any model load, naming each short subset")
    profile = _profile(inputs, tmp_path, eval={"image_text_samples": 6})
    start = time.monotonic()
    assert len(countable_shortfalls(profile)) == 3
    seconds = time.monotonic() - start
    with pytest.raises(PreflightError) as caught:
        preflight(profile)
    message = str(caught.value)
    for subset in SUBSETS:
        assert (f"image_text subset {subset!r}: {inputs}/mirror/{subset}/{subset}.jsonl holds 3 rows; the run takes 2 "
                "for calibration (image_text.num_samples=6) and 2 held-out rows (eval.image_text_samples=6)") in message
    assert seconds < 5, f"counting took {seconds:.1f} s"
    row.observed(f"PreflightError after {seconds:.2f} s: 3 subsets named (3 rows, 2 + 2 needed)")


def test_a_missing_subset_and_a_short_text_mirror_are_named(inputs: Path, tmp_path: Path) -> None:
    profile = _profile(inputs, tmp_path, image_text={"subsets": ["sparsetables", "chartqa"], "num_samples": 2},
                       text={"num_samples": 9}, eval={"image_text_samples": 2})
    problems = countable_shortfalls(profile)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"text.path {inputs}/text.jsonl holds 5 rows with a non-empty 'article', "
                                  "text.num_samples=9 requested")
    assert "chartqa/chartqa.jsonl not found" in problems[1]
    assert "has subsets ['plotqa_cot', 'sparsetables', 'wiki_en']" in problems[1]


def test_a_malformed_row_among_those_counted_is_named_by_line(inputs: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.jsonl"
    text.write_text((inputs / "text.jsonl").read_text().replace("\n", "\n{oops\n", 1))
    problems = countable_shortfalls(_profile(inputs, tmp_path, text={"path": str(text)}))
    assert problems == [f"{text}:2: not a JSON row (Expecting property name enclosed in double quotes at column 2); "
                        "fix or delete that line of the source"]


def test_a_text_only_base_skips_the_image_text_counts(inputs: Path, tmp_path: Path) -> None:
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    profile = _profile(inputs, tmp_path, base={"local_dir": str(model)}, eval={"image_text_samples": 60})
    assert countable_shortfalls(profile) == []
