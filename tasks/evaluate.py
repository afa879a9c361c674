"""Evaluate step: the EXPORTED NVFP4 checkpoint against its BF16 base on held-out text.

The NVFP4 side is the exported files read by ``quantdag.format.reader`` (E2M1 weights with their E4M3
block scales and FP32 global scale; activations fake-quantized per 16-element block with the
exported ``input_scale``), so what is measured is the file that will be deployed, not ModelOpt's
in-memory model (which export mutates and whose shared-input amax differ from the file). Both
models run in float32 so the comparison measures quantization, not bf16 rounding.

Metrics over ``max_windows`` windows of ``seq_len`` tokens (next-token prediction):
perplexity of each model, their ratio, mean token KL(BF16 || NVFP4) in nats, top-1 agreement;
for a VLM with held-out image-text rows, the same over the answer tokens (full VLM forward);
checkpoint bytes and bits per parameter against BF16.
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

from conf.schema import EvalSpec, ImageTextSource
from quantdag.model import loading as modeling
from quantdag.runtime import devices
from quantdag.model.loading import BaseRef
from quantdag.runtime.progress import Progress
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.fetch import read_rows
from quantdag.runtime.prefect_task import quantdag_task

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


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor,
                   start: int = 1) -> dict[str, float]:
    """Sums over next-token positions of one sequence.

    Args:
        reference, candidate: float32 ``[1, T, V]`` logits of the BF16 and NVFP4 models.
        ids: int64 ``[1, T]`` input tokens.
        start: first target position scored (1: every next token; an answer's first token
            position: answer tokens only).

    Returns:
        ``nll_ref``, ``nll_cand`` (nats, summed), ``kl`` (KL(ref || cand), nats, summed),
        ``agree`` (top-1 matches) and ``tokens`` (T - start positions).
    """
    targets = ids[:, start:]
    ref = F.log_softmax(reference[:, start - 1:-1], dim=-1)
    cand = F.log_softmax(candidate[:, start - 1:-1], dim=-1)
    return {
        "nll_ref": float(-ref.gather(-1, targets[..., None]).sum()),
        "nll_cand": float(-cand.gather(-1, targets[..., None]).sum()),
        "kl": float((ref.exp() * (ref - cand)).sum()),
        "agree": float((ref.argmax(-1) == cand.argmax(-1)).sum()),
        "tokens": float(targets.numel()),
    }


def summarise(totals: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Perplexities, their ratio, mean KL and top-1 agreement from summed statistics (keys prefixed)."""
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
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def _add(totals: dict[str, float], stats: dict[str, float]) -> dict[str, float]:
    return {key: totals.get(key, 0.0) + value for key, value in stats.items()}


def answer_token_stats(reference: torch.nn.Module, candidate: torch.nn.Module, base: BaseRef, rows_dir: Path,
                       rows: list[dict[str, Any]], source: ImageTextSource, device: torch.device) -> dict[str, float]:
    """Summed statistics over the ASSISTANT answer tokens of image-text rows, full VLM forward.

    Each row runs once through both models with its image (processor -> ``pixel_values`` ->
    vision tower -> language model); only the tokens after the prompt (``add_generation_prompt``
    rendering of the user turns) are scored.

    Raises:
        ValueError: a row has no assistant answer to score.
    """
    from tasks.calibrate import chat_messages

    processor = modeling.load_processor(base)
    totals: dict[str, float] = {}
    with Progress("evaluate image_text", len(rows), key="evaluate-image-text") as bar:
        for row in rows:
            messages, images = chat_messages(rows_dir, row, source.max_image_pixels)
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"image-text row {row.get('id')}: last message is not an assistant answer")
            full = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=images or None,
                             return_tensors="pt")
            prompt_text = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            start = int(processor(text=[prompt_text], images=images or None, return_tensors="pt")["input_ids"].shape[1])
            batch = {k: v.to(device) for k, v in full.items()}
            with torch.no_grad():
                ref = reference(**batch, use_cache=False).logits.float()
                cand = candidate(**batch, use_cache=False).logits.float()
            totals = _add(totals, compare_logits(ref, cand, batch["input_ids"], start=start))
            bar.update()
    return totals


def evaluate(base: BaseRef, checkpoint: ArtifactRef, spec: EvalSpec, store: ArtifactStore, device: str = "auto",
             image_text_rows: ArtifactRef | None = None, image_text_source: ImageTextSource | None = None) -> ArtifactRef:
    """Evaluate the exported checkpoint against the BF16 base.

    ``image_text_rows`` (held-out rows, with ``image_text_source`` for the image size cap) adds the
    same metrics over answer tokens of image-text rows, prefixed ``image_text_``.

    Returns:
        An ``eval-report`` artifact (``eval_report.json``, ``eval_report.md``); ``meta`` holds the
        metrics of :func:`summarise` plus ``checkpoint_bytes``, ``base_bytes``,
        ``bits_per_parameter`` and ``seconds``.

    Raises:
        ValueError: the eval text is too short (see :func:`eval_windows`).
    """
    from quantdag.format.reader import load_nvfp4_model

    start = time.perf_counter()
    torch_device = devices.pick_device(device)
    windows = eval_windows(load_eval_text(spec), modeling.load_tokenizer(base), spec)
    export_dir = store.local_dir(checkpoint)
    reference = modeling.load_model(base, torch_device, dtype=torch.float32).model
    candidate = load_nvfp4_model(export_dir, dtype=torch.float32, device=torch_device).model.eval()
    totals: dict[str, float] = {}
    with Progress("evaluate", windows.shape[0], key="evaluate") as bar:
        for window in windows:
            ids = window[None].to(torch_device)
            totals = _add(totals, compare_logits(_logits(reference, ids), _logits(candidate, ids), ids))
            bar.update()
    answers: dict[str, float] = {}
    if image_text_rows is not None and image_text_source is not None:
        rows_dir, rows = read_rows(store, image_text_rows)
        stats = answer_token_stats(reference, candidate, base, rows_dir, rows, image_text_source, torch_device)
        answers = {**summarise(stats, prefix="image_text_"), "image_text_rows": float(len(rows))}
    params = sum(p.numel() for p in reference.parameters())
    quantized_bytes = checkpoint.meta.get("safetensors_bytes") or sum(
        size for name, size in checkpoint.files.items() if name.endswith(".safetensors"))
    metrics = {
        **summarise(totals),
        **answers,
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


@quantdag_task("evaluate", model_step=True)
def evaluate_task(base: BaseRef, checkpoint: ArtifactRef, spec: EvalSpec, artifact_store: str, device: str,
                  code_version: str, image_text_rows: ArtifactRef | None = None,
                  image_text_source: ImageTextSource | None = None) -> ArtifactRef:
    """Prefect wrapper of :func:`evaluate`."""
    return evaluate(base, checkpoint, spec, ArtifactStore(artifact_store), device, image_text_rows, image_text_source)
