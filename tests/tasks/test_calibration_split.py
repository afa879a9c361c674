"""Calibration calls per GPU: shards dealt round-robin, several shards of a call on one load, same states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conf.schema import BaseModelSpec, RecipeSpec, TextSource
from quantdag.calibration.quantizer_state import STATE_FILE, load_state
from quantdag.model import warm
from quantdag.model.loading import resolve_base
from quantdag.runtime.store import ArtifactStore
from tasks.calibrate import PRELOAD_NOTE, calibrate, run_name
from tasks.calibration_split import calibration_calls, call_labels, shard_units
from tasks.fetch import fetch_text
from tiny_models import write_corpus, write_tiny_llama


@pytest.mark.parametrize(("shards", "gpus", "expected"), [
    ({"image_text": 2, "text": 2}, 2, [{"image_text": (0, 2), "text": (0, 2)}, {"image_text": (1, 2), "text": (1, 2)}]),
    ({"text": 4}, 2, [{"text": [(0, 4), (2, 4)]}, {"text": [(1, 4), (3, 4)]}]),
    ({"image_text": 1, "text": 3}, 3, [{"image_text": (0, 1), "text": (2, 3)}, {"text": (0, 3)}, {"text": (1, 3)}]),
    ({"image_text": 1, "text": 1}, 8, [{"image_text": (0, 1)}, {"text": (0, 1)}]),
])
def test_gpu_calls_deal_every_shard_once_round_robin(shards, gpus, expected) -> None:
    calls = calibration_calls(shards, gpus)
    assert calls == expected
    units = [unit for call in calls for unit in shard_units(call, call)]
    assert sorted(units) == sorted((k, i, n) for k, n in shards.items() for i in range(n)), "each shard exactly once"


def test_work_pool_calls_are_one_per_shard_even_unsharded() -> None:
    assert calibration_calls({"image_text": 1, "text": 1}, 1, per_shard=True) == [{"image_text": (0, 1)}, {"text": (0, 1)}]
    assert calibration_calls({"text": 2}, 1, per_shard=True) == [{"text": (0, 2)}, {"text": (1, 2)}]


def test_labels_read_json_shards() -> None:
    assert call_labels(["text"], {"text": [[1, 4], [3, 4]]}) == ["text[1]", "text[3]"]
    assert call_labels(["image_text", "text"], {"text": [0, 2]}) == ["image_text", "text[0]"]
    assert run_name({"rows": {"image_text": 0, "text": 0}, "shards": {"image_text": (1, 2), "text": (1, 2)}}) == \
        "calibrate_image_text[1]+text[1]"


@pytest.fixture
def tiny(tmp_path: Path):
    rows_file, _ = write_corpus(tmp_path / "data")
    store = ArtifactStore(str(tmp_path / "store"))
    source = TextSource(path=str(rows_file), num_samples=4, seq_len=32)
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp_path / "llama"))))
    return base, store, source, fetch_text(source, store)


def _amax(store: ArtifactStore, ref) -> dict[str, torch.Tensor]:
    return load_state(store.local_dir(ref) / STATE_FILE)["amax"]


def test_shards_of_one_call_equal_their_own_calls_bit_for_bit(tiny) -> None:
    base, store, source, rows = tiny
    grouped = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu",
                        shards={"text": [(0, 3), (2, 3)]})
    assert list(grouped) == ["text[0]", "text[2]"]
    assert [grouped[label].meta["model_loads"] for label in grouped] == [1.0, 0.0], "one load for both shards"
    warm.release()
    for shard in (0, 2):
        alone = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu", shards={"text": (shard, 3)})
        warm.release()
        a, b = _amax(store, grouped[f"text[{shard}]"]), _amax(store, alone[f"text[{shard}]"])
        differing = [name for name in a if not torch.equal(a[name], b[name])]
        assert a.keys() == b.keys() and not differing, f"text[{shard}] differs at {differing[:5]}"
    first, second = _amax(store, grouped["text[0]"]), _amax(store, grouped["text[2]"])
    assert any(not torch.equal(first[n], second[n]) for n in first), "the two shards must differ (or this proves nothing)"
    with pytest.raises(ValueError, match=r"text: shard 2 of 3 is listed twice"):
        calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu", shards={"text": [(2, 3), (2, 3)]})


def test_a_preloaded_model_is_taken_and_counted_as_the_calls_load(tiny) -> None:
    from tasks.preload import preload_base

    base, store, source, rows = tiny
    loaded = preload_base(base, "cpu")
    assert loaded["loaded"] and warm.kept_key() is not None
    refs = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu", shards={"text": (1, 2)})
    meta = refs["text[1]"].meta
    assert meta["preloaded"] == 1.0 and meta["model_loads"] == 1.0, meta
    assert meta["load_seconds"] == pytest.approx(loaded["load_seconds"]), "the preload's seconds are the call's load"
    again = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu", shards={"text": (0, 2)})
    assert again["text[0]"].meta["model_loads"] == 0.0 and again["text[0]"].meta["preloaded"] == 0.0, \
        "the kept calibrated model is no new load"
    assert PRELOAD_NOTE not in (warm.take(warm.kept_key())[2])
