"""The reference record and the metrics against it: exact with the whole vocabulary, a lower bound with top k."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantdag.evaluation.logprobs import compare_logits, compare_to_reference, reference_record, summarise


def _pair(vocab: int = 300, tokens: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, tokens, vocab, generator=generator) * 3
    candidate = reference + torch.randn(1, tokens, vocab, generator=generator) * 0.5
    return reference, candidate, torch.randint(0, vocab, (1, tokens), generator=generator)


def _full(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor, start: int = 1) -> dict[str, float]:
    p = F.log_softmax(reference[0, start - 1:-1].double(), -1)
    q = F.log_softmax(candidate[0, start - 1:-1].double(), -1)
    targets = ids[0, start:, None]
    return {"kl": float((p.exp() * (p - q)).sum()), "nll_ref": float(-p.gather(-1, targets).sum()),
            "nll_cand": float(-q.gather(-1, targets).sum()), "agree": float((p.argmax(-1) == q.argmax(-1)).sum())}


@pytest.mark.parametrize("start", [1, 17])
def test_whole_vocabulary_gives_the_exact_figures(start: int) -> None:
    reference, candidate, ids = _pair()
    got, want = compare_logits(reference, candidate, ids, start=start), _full(reference, candidate, ids, start)
    assert got["tokens"] == ids.shape[1] - start
    for key in ("kl", "nll_ref", "nll_cand"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), f"{key}: {got[key]} vs exact {want[key]}"
    assert got["agree"] == want["agree"]


def test_top_k_kl_is_a_lower_bound_that_tightens_with_k() -> None:
    reference, candidate, ids = _pair()
    exact = _full(reference, candidate, ids)["kl"]
    kls = [compare_to_reference(reference_record(reference, ids, top_k=k), candidate, ids)["kl"] for k in (4, 32, 300)]
    assert kls[0] <= kls[1] + 1e-9 <= exact + 1e-6, f"top-k KL must grow towards the exact {exact}: {kls}"
    assert kls[0] < 0.95 * exact, "a 4-token top keeps too little mass here to be exact; the test would not see a bound"
    assert kls[2] == pytest.approx(exact, rel=1e-4)


def test_record_is_small_and_typed() -> None:
    reference, _, ids = _pair(vocab=1000, tokens=65)
    record = reference_record(reference.bfloat16(), ids, top_k=8)
    assert record["target_logprob"].shape == (64,) and record["target_logprob"].dtype == torch.float32
    assert record["top_logprob"].shape == (64, 8) and record["top_ids"].dtype == torch.int32
    assert bool((record["top_logprob"][:, :-1] >= record["top_logprob"][:, 1:]).all()), "top k in descending order"


def test_identical_models_score_zero_kl_and_full_agreement() -> None:
    reference, _, ids = _pair()
    stats = compare_to_reference(reference_record(reference, ids, top_k=16), reference.clone(), ids)
    metrics = summarise(stats)
    assert metrics["kl_mean"] == pytest.approx(0.0, abs=1e-6) and metrics["top1_agreement"] == 1.0
    assert metrics["perplexity_ratio"] == pytest.approx(1.0, rel=1e-6)


def test_a_record_of_another_sequence_length_is_refused() -> None:
    reference, candidate, ids = _pair()
    record = reference_record(reference, ids)
    with pytest.raises(ValueError, match="positions"):
        compare_to_reference(record, candidate[:, :-1], ids[:, :-1])
    with pytest.raises(ValueError, match="start"):
        reference_record(reference, ids, start=ids.shape[1])
