from __future__ import annotations

import itertools

import pytest
import torch

from tasks.merge import merge_states


def _state(values: dict[str, float | list[float]]) -> dict:
    amax = {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}
    inputs = sorted(n for n in values if n.endswith("input_quantizer"))
    return {"modelopt_state": {"marker": 1}, "amax": amax, "input_quantizers": inputs}


BASE = {"l0.q.weight_quantizer": 2.0, "l0.q.input_quantizer": 1.0, "l0.down.input_quantizer": [0.5, 3.0]}


def test_merge_is_elementwise_max_and_records_source() -> None:
    a = _state(BASE)
    b = _state({**BASE, "l0.q.input_quantizer": 4.0, "l0.down.input_quantizer": [1.5, 2.0]})
    merged = merge_states([a, b], ["image_text", "text"])
    assert float(merged["amax"]["l0.q.input_quantizer"]) == 4.0
    assert merged["amax"]["l0.down.input_quantizer"].tolist() == [1.5, 3.0]
    assert merged["sources"]["l0.q.input_quantizer"] == "text"
    assert float(a["amax"]["l0.q.input_quantizer"]) == 1.0, "merge must not mutate its inputs"


def test_merge_is_order_and_grouping_independent_bitwise() -> None:
    gen = torch.Generator().manual_seed(0)
    shards = []
    for _ in range(4):
        values = {f"m{i}.input_quantizer": torch.rand(3, generator=gen).tolist() for i in range(5)}
        shards.append(_state({**values, "m0.weight_quantizer": 1.0}))
    reference = merge_states(shards)["amax"]
    for order in itertools.permutations(range(4)):
        merged = merge_states([shards[i] for i in order])["amax"]
        assert all(torch.equal(merged[k], reference[k]) for k in reference)
    nested = merge_states([merge_states(shards[:2]), merge_states(shards[2:])])["amax"]
    assert all(torch.equal(nested[k], reference[k]) for k in reference)


def test_mismatched_quantizer_sets_name_both_sides() -> None:
    a = _state(BASE)
    b = _state({**BASE, "l1.extra.input_quantizer": 1.0})
    with pytest.raises(ValueError, match="l1.extra.input_quantizer"):
        merge_states([a, b], ["image_text", "text"])


def test_different_weight_amax_is_an_error() -> None:
    a = _state(BASE)
    b = _state({**BASE, "l0.q.weight_quantizer": 2.5})
    with pytest.raises(ValueError, match="different base weights"):
        merge_states([a, b])


def test_shape_mismatch_is_an_error() -> None:
    a = _state(BASE)
    b = _state({**BASE, "l0.down.input_quantizer": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="shapes differ"):
        merge_states([a, b])


@pytest.mark.parametrize("bad, reason", [(float("nan"), "not finite"), (0.0, "only saw zeros"), (float("inf"), "not finite")])
def test_unusable_input_amax_names_the_module(bad: float, reason: str) -> None:
    a = _state({**BASE, "l0.down.input_quantizer": bad})
    with pytest.raises(ValueError, match=rf"l0\.down: .*{reason}"):
        merge_states([a, _state({**BASE, "l0.down.input_quantizer": bad})])


def test_missing_amax_of_enabled_input_quantizer_is_reported() -> None:
    a = _state(BASE)
    del a["amax"]["l0.q.input_quantizer"]
    with pytest.raises(ValueError, match="never reached"):
        merge_states([a])


def test_empty_merge_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        merge_states([])
