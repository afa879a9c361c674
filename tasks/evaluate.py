"""Evaluate step: the EXPORTED NVFP4 checkpoint against its BF16 base on held-out text.

The NVFP4 side is the exported files read by ``quantdag.reader`` (E2M1 weights with their E4M3
block scales and FP32 global scale; activations fake-quantized per 16-element block with the
exported ``input_scale``), so what is measured is the file that will be deployed, not ModelOpt's
in-memory model (which export mutates and whose shared-input amax differ from the file). Both
models run in float32 so the comparison measures quantization, not bf16 rounding.

Metrics over ``max_windows`` windows of ``seq_len`` tokens (next-token prediction):
perplexity of each model, their ratio, mean token KL(BF16 || NVFP4) in nats, top-1 agreement.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F

from conf.schema import EvalSpec
from quantdag import modeling
from quantdag.modeling import BaseRef
from quantdag.progress import Progress
from quantdag.store import ArtifactRef, ArtifactStore
from tasks.prefect_task import quantdag_task

REPORT_KIND = "eval-report"


def load_eval_text(spec: EvalSpec) -> str:
    """The held-out text: a raw file (local or s3://) or a Hub dataset's text column joined by newlines."""
    if spec.path is not None:
        with fsspec.open(spec.path, "rt", encoding="utf-8") as handle:
            return handle.read()
    import datasets

    dataset = datasets.load_dataset(spec.repo_id, spec.config, split=spec.split)
    return "\n".join(row["text"] for row in dataset if row["text"].strip())


def eval_windows(text: str, tokenizer: Any, spec: EvalSpec) -> torch.Tensor:
    """Token windows ``int64 [W, seq_len]`` taken from the start of ``text``.

    Raises:
        ValueError: the text yields fewer than ``seq_len + 1`` tokens.
    """
    needed = spec.seq_len * spec.max_windows
    ids = tokenizer(text[: needed * 12], return_tensors="pt")["input_ids"][0]
    windows = ids.numel() // spec.seq_len
    if windows == 0:
        raise ValueError(f"eval text has {ids.numel()} tokens, fewer than eval.seq_len={spec.seq_len}")
    windows = min(windows, spec.max_windows)
    return ids[: windows * spec.seq_len].view(windows, spec.seq_len)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Sums over next-token positions of one window.

    Args:
        reference, candidate: float32 ``[1, T, V]`` logits of the BF16 and NVFP4 models.
        ids: int64 ``[1, T]`` input tokens.

    Returns:
        ``nll_ref``, ``nll_cand`` (nats, summed), ``kl`` (KL(ref || cand), nats, summed),
        ``agree`` (top-1 matches) and ``tokens`` (T - 1 positions).
    """
    targets = ids[:, 1:]
    ref = F.log_softmax(reference[:, :-1], dim=-1)
    cand = F.log_softmax(candidate[:, :-1], dim=-1)
    return {
        "nll_ref": float(-ref.gather(-1, targets[..., None]).sum()),
        "nll_cand": float(-cand.gather(-1, targets[..., None]).sum()),
        "kl": float((ref.exp() * (ref - cand)).sum()),
        "agree": float((ref.argmax(-1) == cand.argmax(-1)).sum()),
        "tokens": float(targets.numel()),
    }


def summarise(totals: dict[str, float]) -> dict[str, float]:
    """Perplexities, their ratio, mean KL and top-1 agreement from summed window statistics."""
    tokens = totals["tokens"]
    ppl_ref, ppl_cand = math.exp(totals["nll_ref"] / tokens), math.exp(totals["nll_cand"] / tokens)
    return {
        "perplexity_bf16": ppl_ref,
        "perplexity_nvfp4": ppl_cand,
        "perplexity_ratio": ppl_cand / ppl_ref,
        "kl_mean": totals["kl"] / tokens,
        "top1_agreement": totals["agree"] / tokens,
        "eval_tokens": tokens,
    }


def evaluate(base: BaseRef, checkpoint: ArtifactRef, spec: EvalSpec, store: ArtifactStore,
             device: str = "auto") -> ArtifactRef:
    """Evaluate the exported checkpoint against the BF16 base.

    Returns:
        An ``eval-report`` artifact (``eval_report.json``, ``eval_report.md``); ``meta`` holds the
        metrics of :func:`summarise` plus ``checkpoint_bytes``, ``base_bytes``,
        ``bits_per_parameter`` and ``seconds``.

    Raises:
        ValueError: the eval text is too short (see :func:`eval_windows`).
    """
    from quantdag.reader import load_nvfp4_model

    start = time.perf_counter()
    torch_device = modeling.pick_device(device)
    windows = eval_windows(load_eval_text(spec), modeling.load_tokenizer(base), spec)
    export_dir = store.local_dir(checkpoint)
    reference = modeling.load_model(base, torch_device, dtype=torch.float32).model
    candidate = load_nvfp4_model(export_dir, dtype=torch.float32).to(torch_device).eval()
    totals = {"nll_ref": 0.0, "nll_cand": 0.0, "kl": 0.0, "agree": 0.0, "tokens": 0.0}
    with Progress("evaluate", windows.shape[0], key="evaluate") as bar:
        for window in windows:
            ids = window[None].to(torch_device)
            stats = compare_logits(_logits(reference, ids), _logits(candidate, ids), ids)
            totals = {k: totals[k] + stats[k] for k in totals}
            bar.update()
    params = sum(p.numel() for p in reference.parameters())
    quantized_bytes = checkpoint.meta.get("safetensors_bytes") or sum(
        size for name, size in checkpoint.files.items() if name.endswith(".safetensors"))
    metrics = {
        **summarise(totals),
        "checkpoint_bytes": float(quantized_bytes),
        "base_bytes": float(params * 2),
        "bits_per_parameter": 8.0 * quantized_bytes / params,
        "size_ratio_vs_bf16": quantized_bytes / (params * 2),
        "seconds": time.perf_counter() - start,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "eval_report.json").write_text(json.dumps({"metrics": metrics, "eval": spec.model_dump()}, indent=1))
        (out / "eval_report.md").write_text(report_markdown(metrics, spec))
        return store.put_dir(out, REPORT_KIND, metrics)


def report_markdown(metrics: dict[str, float], spec: EvalSpec) -> str:
    """A small markdown table of the evaluation metrics."""
    rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in metrics.items())
    source = spec.path or f"{spec.repo_id}/{spec.config}/{spec.split}"
    return (f"# NVFP4 vs BF16\n\nHeld-out text: `{source}`, {spec.max_windows} windows x {spec.seq_len} tokens "
            f"(float32 compute; NVFP4 read from the exported files).\n\n| metric | value |\n|---|---|\n{rows}\n")


@quantdag_task("evaluate")
def evaluate_task(base: BaseRef, checkpoint: ArtifactRef, spec: EvalSpec, artifact_store: str, device: str,
                  code_version: str) -> ArtifactRef:
    """Prefect wrapper of :func:`evaluate`."""
    return evaluate(base, checkpoint, spec, ArtifactStore(artifact_store), device)
