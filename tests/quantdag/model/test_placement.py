"""Placement within a memory budget: a budget that forces offload gives the same amax and the same export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conf.schema import BaseModelSpec, PlacementSpec, RecipeSpec, TextSource
from quantdag.calibration.quantizer_state import STATE_FILE, load_state
from quantdag.model import warm
from quantdag.model.loading import resolve_base
from quantdag.model.placement import GIB, model_skeleton, plan_placement
from quantdag.runtime.store import ArtifactStore
from tasks.calibrate import calibrate
from tasks.export import export_checkpoint
from tasks.fetch import fetch_text
from tasks.merge import merge_amax
from tiny_models import write_corpus, write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("placement")
    rows, _ = write_corpus(tmp / "data")
    store = ArtifactStore(str(tmp / "store"))
    source = TextSource(path=str(rows), num_samples=4, seq_len=32)
    base = resolve_base(BaseModelSpec(local_dir=str(write_tiny_llama(tmp / "llama"))))
    return base, store, source, fetch_text(source, store)


def _budget_for_half(base) -> float:
    """A budget (GiB) whose room (80%) holds the embeddings and about half of the decoder layers."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model_skeleton(base, torch.float32), dtype=torch.float32)
    room = sizes["model.embed_tokens"] + sizes["model.layers.0"] + sizes["model.norm"] + 1024
    return room / 0.8 / GIB


def test_no_budget_on_the_cpu_keeps_the_whole_model_in_place(tiny) -> None:
    base = tiny[0]
    placement = plan_placement(base, torch.device("cpu"), PlacementSpec(), dtype=torch.float32)
    assert placement.whole and placement.load_kwargs() == {}, placement.describe()
    assert placement.weight_bytes > 0


def test_a_budget_smaller_than_the_weights_spreads_them_to_disk(tiny) -> None:
    base = tiny[0]
    spec = PlacementSpec(memory_budget_gib=_budget_for_half(base))
    placement = plan_placement(base, torch.device("cpu"), spec, dtype=torch.float32)
    assert not placement.whole, placement.describe()
    assert placement.offload_tiers.get("disk", 0) >= 1, f"some layers must go to disk: {placement.device_map}"
    assert "cpu" in placement.device_map.values(), f"some layers must stay in RAM: {placement.device_map}"
    room = spec.memory_budget_gib * GIB * (1 - spec.reserve_fraction)
    assert placement.weight_bytes > room, "the budget must be smaller than the weights for this test to mean anything"


def test_budgeted_calibration_and_export_are_bit_identical_to_unbudgeted(tiny, tmp_path: Path) -> None:
    base, store, source, rows = tiny
    budget = PlacementSpec(memory_budget_gib=_budget_for_half(base))
    results = {}
    for name, placement in (("whole", PlacementSpec()), ("offloaded", budget)):
        warm.release()
        states = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu", placement=placement)
        assert warm.kept_key() is not None, "calibration keeps its model for export"
        merged = merge_amax(states, store)
        checkpoint = export_checkpoint(base, merged, RecipeSpec(), store, "cpu", placement)
        assert checkpoint.meta["model_loads"] == 0, "export takes the calibrated model: no second load"
        assert warm.kept_key() is None, "export never leaves its (packed) model behind"
        results[name] = (load_state(store.local_dir(states["text"]) / STATE_FILE), states["text"].meta, checkpoint)
    (whole, whole_meta, whole_ckpt), (offloaded, off_meta, off_ckpt) = results["whole"], results["offloaded"]
    assert "spread" in off_meta["placement"] and "disk" in off_meta["offloaded_modules"], off_meta["placement"]
    assert "whole" in whole_meta["placement"], whole_meta["placement"]
    assert set(whole["amax"]) == set(offloaded["amax"]) and whole["amax"]
    unequal = [name for name in whole["amax"] if not torch.equal(whole["amax"][name], offloaded["amax"][name])]
    assert not unequal, f"amax differ under the budget at {len(unequal)} quantizers: {unequal[:5]}"
    tensors = [{key: value for file in sorted(store.local_dir(ckpt).glob("*.safetensors"))
                for key, value in load_file(str(file)).items()} for ckpt in (whole_ckpt, off_ckpt)]
    assert set(tensors[0]) == set(tensors[1])
    different = [key for key in tensors[0] if not torch.equal(tensors[0][key], tensors[1][key])]
    assert not different, f"exported tensors differ under the budget: {different[:5]}"


def test_export_without_a_kept_model_loads_and_restores(tiny) -> None:
    base, store, source, rows = tiny
    warm.release()
    states = calibrate(base, {"text": rows}, RecipeSpec(), {"text": source}, store, "cpu")
    merged = merge_amax(states, store)
    kept = export_checkpoint(base, merged, RecipeSpec(), store, "cpu")
    warm.release()  # as after a cache hit of calibration, or calibration in another process
    fresh = export_checkpoint(base, merged, RecipeSpec(), store, "cpu")
    assert (kept.meta["model_loads"], fresh.meta["model_loads"]) == (0, 1)
    assert fresh.sha256 == kept.sha256, "a restored fresh load and the kept calibrated model export the same bytes"
