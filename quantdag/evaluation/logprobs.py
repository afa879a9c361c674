"""Next-token log-probabilities of the BF16 reference, kept small, and the NVFP4 model scored against them.

The reference model runs ONCE per (base commit, evaluation data); what the comparison needs of
its next-token distribution is kept per scored position: the target token's log-probability,
the ``k`` most probable tokens' ids and log-probabilities and the log of the probability left
outside them (float32), nothing else. The NVFP4
model then runs alone and is scored against that record:

- perplexity of each model from the target tokens' log-probabilities;
- KL(BF16 || NVFP4) over the reference's top ``k`` tokens plus one bin for the rest of the
  vocabulary: ``sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)``. Merging tokens
  into one bin never increases a KL divergence (the data-processing inequality; Cover & Thomas,
  *Elements of Information Theory*, 2nd ed., sec. 2.8), so this is a lower bound of the full KL,
  equal to it up to the mass outside the top ``k`` (k = 64 holds nearly all of it for LLMs);
- top-1 agreement: the NVFP4 model's argmax against the reference's (its top id).

Log-probabilities are computed in float32 from the logits, in chunks of positions, so the float32
copy of a ``[T, V]`` logit block never exceeds ``chunk * V * 4`` bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOP_K = 64
"""Reference tokens kept per position (ids + log-probabilities)."""

REFERENCE_FILE = "reference.safetensors"
"""The file of a ``bf16-reference`` artifact that holds the records (``tasks/reference.py``)."""

RECORD_KEYS = ("target_logprob", "top_logprob", "top_ids", "rest_logprob")
"""The per-position tensors of a record (:func:`reference_record`)."""

_CHUNK = 512  # positions per float32 log-softmax block


def reference_record(logits: torch.Tensor, ids: torch.Tensor, start: int = 1, top_k: int = TOP_K) -> dict[str, torch.Tensor]:
    """What the comparison keeps of the reference model's predictions for one sequence.

    Args:
        logits: ``[1, T, V]`` logits (any float dtype) of the reference model.
        ids: int64 ``[1, T]`` input tokens.
        start: first scored target position (1: every next token; a row's first answer token
            position: answer tokens only).
        top_k: how many of the most probable tokens to keep per position.

    Returns:
        ``target_logprob`` float32 ``[N]``, ``top_logprob`` float32 ``[N, k]`` (descending),
        ``top_ids`` int32 ``[N, k]`` and ``rest_logprob`` float32 ``[N]`` (log of the probability
        outside the top k; ``-inf`` when k covers the vocabulary), with ``N = T - start``.

    Raises:
        ValueError: ``start`` leaves no position to score, or shapes disagree.
    """
    _check(logits, ids, start)
    targets, parts = ids[0, start:], {key: [] for key in RECORD_KEYS}
    for lo in range(start - 1, logits.shape[1] - 1, _CHUNK):
        hi = min(lo + _CHUNK, logits.shape[1] - 1)
        logp = F.log_softmax(logits[0, lo:hi].float(), dim=-1)
        parts["target_logprob"].append(logp.gather(-1, targets[lo - start + 1:hi - start + 1, None].to(logp.device))[:, 0])
        values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        parts["top_logprob"].append(values)
        parts["top_ids"].append(indices.int())
        parts["rest_logprob"].append(_rest(logp, indices))
    return {key: torch.cat(chunks).cpu() for key, chunks in parts.items()}


def compare_to_reference(reference: dict[str, torch.Tensor], logits: torch.Tensor, ids: torch.Tensor,
                         start: int = 1) -> dict[str, float]:
    """Sums over the scored positions of one sequence, NVFP4 against the stored reference.

    Args:
        reference: :func:`reference_record` of the same sequence and ``start``.
        logits: ``[1, T, V]`` logits of the candidate (NVFP4) model.
        ids: int64 ``[1, T]`` input tokens (the ones the reference saw).
        start: as given to :func:`reference_record`.

    Returns:
        ``nll_ref``, ``nll_cand`` (nats, summed), ``kl`` (top-k + rest KL(ref || cand), nats,
        summed), ``agree`` (top-1 matches), ``tokens`` (scored positions), ``ref_mass_top_k``
        (summed probability the reference puts on its top k).

    Raises:
        ValueError: the record does not have one entry per scored position.
    """
    _check(logits, ids, start)
    count = logits.shape[1] - start
    if reference["target_logprob"].shape[0] != count:
        raise ValueError(f"reference has {reference['target_logprob'].shape[0]} positions, the sequence {count}")
    targets = ids[0, start:]
    totals = {"nll_ref": -float(reference["target_logprob"].double().sum()), "nll_cand": 0.0, "kl": 0.0,
              "agree": 0.0, "tokens": float(count), "ref_mass_top_k": 0.0}
    for lo in range(start - 1, logits.shape[1] - 1, _CHUNK):
        hi = min(lo + _CHUNK, logits.shape[1] - 1)
        rows = slice(lo - start + 1, hi - start + 1)
        logq = F.log_softmax(logits[0, lo:hi].float(), dim=-1)
        top_ids = reference["top_ids"][rows].to(logq.device).long()
        logp_top = reference["top_logprob"][rows].to(logq.device).double()
        logq_top = logq.gather(-1, top_ids).double()
        logp_rest = reference["rest_logprob"][rows].to(logq.device).double()
        logq_rest = _rest(logq, top_ids).double()
        p_top, p_rest = logp_top.exp(), logp_rest.exp()
        rest = torch.where(p_rest > 0, p_rest * (logp_rest - logq_rest), 0.0)
        totals["kl"] += float((p_top * (logp_top - logq_top)).sum() + rest.sum())
        totals["nll_cand"] -= float(logq.gather(-1, targets[rows, None].to(logq.device)).double().sum())
        totals["agree"] += float((logq.argmax(-1) == top_ids[:, 0]).sum())
        totals["ref_mass_top_k"] += float(p_top.sum())
    return totals


def summarise(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Perplexities, their ratio, mean KL, top-1 agreement and top-k mass from summed statistics.

    Returns:
        ``perplexity_bf16``, ``perplexity_nvfp4``, ``perplexity_ratio``, ``kl_mean`` (nats per
        token), ``top1_agreement``, ``eval_tokens`` and, when summed, ``ref_mass_top_k`` (mean
        reference probability inside the kept top k), each key with ``prefix``.
    """
    tokens = totals["tokens"]
    ppl_ref, ppl_cand = math.exp(totals["nll_ref"] / tokens), math.exp(totals["nll_cand"] / tokens)
    metrics = {
        "perplexity_bf16": ppl_ref,
        "perplexity_nvfp4": ppl_cand,
        "perplexity_ratio": ppl_cand / ppl_ref,
        "kl_mean": totals["kl"] / tokens,
        "top1_agreement": totals["agree"] / tokens,
        "eval_tokens": tokens,
    }
    if "ref_mass_top_k" in totals:
        metrics["ref_mass_top_k"] = totals["ref_mass_top_k"] / tokens
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def add(totals: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    """Element-wise sum of two statistics dicts (keys of either)."""
    return {key: totals.get(key, 0.0) + stats.get(key, 0.0) for key in totals.keys() | stats.keys()}


def _rest(logp: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(logp)))`` over the tokens NOT in ``top_ids`` per row (``-inf`` when none is left)."""
    return torch.logsumexp(logp.scatter(-1, top_ids.long(), float("-inf")), dim=-1)


def _check(logits: torch.Tensor, ids: torch.Tensor, start: int) -> None:
    if logits.ndim != 3 or logits.shape[0] != 1 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits [1, T, V] and ids [1, T] expected, got {tuple(logits.shape)} and {tuple(ids.shape)}")
    if not 1 <= start < logits.shape[1]:
        raise ValueError(f"start={start} leaves no position to score in a sequence of {logits.shape[1]} tokens")


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor, start: int = 1) -> dict[str, float]:
    """Sums of :func:`compare_to_reference` with both models' logits at hand (every token kept: exact KL).

    Args:
        reference, candidate: ``[1, T, V]`` logits of the BF16 and NVFP4 models.
        ids: int64 ``[1, T]`` input tokens.
        start: first scored target position.
    """
    record = reference_record(reference, ids, start=start, top_k=reference.shape[-1])
    return compare_to_reference(record, candidate, ids, start=start)
