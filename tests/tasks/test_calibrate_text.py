from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conf.schema import BaseModelSpec, RecipeSpec, TextSource
from quantdag.model import loading as modeling
from quantdag.model.loading import resolve_base
from quantdag.calibration.quantizer_state import STATE_FILE, load_state
from quantdag.runtime.store import ArtifactStore
from tasks.calibrate import calibrate
from tasks.fetch import fetch_text
from tiny_models import write_corpus, write_tiny_llama


@pytest.fixture
def setup(tmp_path: Path):
    rows, _ = write_corpus(tmp_path / "data")
    store = ArtifactStore(str(tmp_path / "store"))
    source = TextSource(path=str(rows), num_samples=4, seq_len=32)
    return tmp_path, store, source, fetch_text(source, store)


def test_text_calibration_writes_only_quantizer_state(setup) -> None:
    tmp, store, source, rows = setup
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp / "llama"))))
    refs = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu")
    assert list(refs) == ["text"], f"one state labelled by its branch expected, got {list(refs)}"
    ref = refs["text"]
    assert set(ref.files) == {STATE_FILE, "metrics.json"}, "a calibration step must not write the model"
    state = load_state(store.local_dir(ref) / STATE_FILE)
    assert ref.meta["rows"] == 4 and ref.meta["tokens"] > 0
    inputs = state["input_quantizers"]
    assert "model.layers.0.mlp.down_proj.input_quantizer" in inputs
    assert not any("lm_head" in name for name in inputs), "lm_head is excluded by the recipe"
    assert all(torch.isfinite(state["amax"][n]).all() and (state["amax"][n] > 0).all() for n in inputs)
    size = store.local_dir(ref).joinpath(STATE_FILE).stat().st_size
    weights = sum(p.stat().st_size for p in (tmp / "llama").glob("*.safetensors"))
    assert size < weights / 4, f"state file {size} B is not small next to the {weights} B of weights"


def test_down_proj_that_only_sees_zeros_is_named_before_export(setup) -> None:
    tmp, store, source, rows = setup
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp / "llama0", zero_up_proj_layer=1))))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: amax 0"):
        calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu")


def test_module_the_loop_never_reaches_is_named(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, store, source, rows = setup
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp / "llama1"))))
    real_load = modeling.load_model

    def load_with_skipped_layer(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        layer = loaded.model.model.layers[1]
        layer.forward = lambda hidden_states, *a, **k: hidden_states  # the loop never runs layer 1
        return loaded

    monkeypatch.setattr(modeling, "load_model", load_with_skipped_layer)
    with pytest.raises(ValueError) as err:
        calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu")
    message = str(err.value)
    for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert f"model.layers.1.{module}" in message, f"{module} of the skipped layer not named:\n{message}"
    assert "model.layers.0." not in message


def test_unknown_calibration_kind_is_refused(setup) -> None:
    tmp, store, source, rows = setup
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp / "llama2"))))
    with pytest.raises(ValueError, match="calibration kind"):
        calibrate(base, {"audio": rows}, RecipeSpec(), {"audio": source}, store, "cpu")


def test_sharded_calibration_merges_bit_identical_to_one_pass(setup) -> None:
    from tasks.merge import merge_states

    tmp, store, source, rows = setup
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp / "llama3"))))
    def state(shard: int = 0, num_shards: int = 1) -> dict:
        refs = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu",
                         shards={"text": (shard, num_shards)})
        (label,) = refs
        assert label == ("text" if num_shards == 1 else f"text[{shard}]"), label
        return load_state(store.local_dir(refs[label]) / STATE_FILE)

    single = state()
    shards = [state(i, 3) for i in range(3)]
    assert [len(s["amax"]) for s in shards] == [len(single["amax"])] * 3
    merged = merge_states(shards)
    differing = [n for n in single["amax"] if not torch.equal(single["amax"][n], merged["amax"][n])]
    assert not differing, f"sharded merge differs from one pass at {differing[:5]}"
    assert any(not torch.equal(shards[0]["amax"][n], single["amax"][n]) for n in single["input_quantizers"]), \
        "a single shard should not already equal the full pass (the test would prove nothing)"
    with pytest.raises(ValueError, match="no rows"):
        calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu", shards={"text": (4, 5)})
