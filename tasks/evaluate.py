"""Evaluate step: the EXPORTED NVFP4 checkpoint against the stored BF16 reference on held-out data.

The NVFP4 side is the exported files read by ``quantdag.format.reader`` (E2M1 weights with their
E4M3 block scales and FP32 global scale, kept packed and dequantized per layer at run time;
activations fake-quantized per 16-element block with the exported ``input_scale``), so what is
measured is the file that will be deployed, not ModelOpt's in-memory model. It runs alone: the
BF16 side is the ``bf16-reference`` artifact (``tasks/reference.py``: target log-probability and
top-k of every scored position, computed once per base and evaluation data), so the step never
holds two models. Compute is BF16 on a GPU and float32 on the CPU, as for the reference.

Metrics over the reference's windows (``max_windows`` x ``seq_len`` tokens, next-token
prediction): perplexity of each model, their ratio, mean token KL(BF16 || NVFP4) in nats over
the reference's top k plus the rest (``quantdag.evaluation.logprobs``), top-1 agreement; for a
VLM with held-out image-text rows, the same over the answer tokens (full VLM forward); checkpoint
bytes and bits per parameter against BF16.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import torch

from conf.schema import EvalSpec, ImageTextSource, PlacementSpec
from quantdag.evaluation.logprobs import RECORD_KEYS, REFERENCE_FILE, add, compare_to_reference, summarise
from quantdag.model import loading as modeling
from quantdag.model import warm
from quantdag.model.loading import BaseRef
from quantdag.runtime import devices
from quantdag.runtime.measure import step_meter
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.progress import Progress
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.fetch import read_rows

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


def answer_inputs(base: BaseRef, rows_dir: Path, rows: list[dict[str, Any]], source: ImageTextSource,
                  device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Each held-out image-text row as a full-VLM batch and the position of its first answer token.

    Each row goes through the base's processor with its image (``input_ids`` with the vision
    placeholders, ``pixel_values``, ``image_grid_thw``); the answer starts after the
    ``add_generation_prompt`` rendering of the user turns.

    Yields:
        ``(batch, start)``: tensors on ``device`` and the first scored target position.

    Raises:
        ValueError: a row has no assistant answer to score (row id named).
    """
    from tasks.calibrate import chat_messages

    processor = modeling.load_processor(base)
    with Progress("image_text answers", len(rows), key="image-text-answers") as bar:
        for row in rows:
            messages, images = chat_messages(rows_dir, row, source.max_image_pixels)
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"image-text row {row.get('id')}: last message is not an assistant answer")
            full = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=images or None,
                             return_tensors="pt")
            prompt_text = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            start = int(processor(text=[prompt_text], images=images or None, return_tensors="pt")["input_ids"].shape[1])
            yield {k: v.to(device) for k, v in full.items()}, start
            bar.update()


def evaluate(base: BaseRef, checkpoint: ArtifactRef, reference: ArtifactRef, spec: EvalSpec, store: ArtifactStore,
             device: str = "auto", placement: PlacementSpec = PlacementSpec(),
             image_text_rows: ArtifactRef | None = None, image_text_source: ImageTextSource | None = None) -> ArtifactRef:
    """Score the exported checkpoint against the stored BF16 reference.

    Args:
        base: the resolved base (its processor renders the held-out image-text rows).
        checkpoint: the exported NVFP4 checkpoint.
        reference: the ``bf16-reference`` artifact of the same base, ``spec`` and held-out rows.
        spec: the evaluation spec (for the report).
        store: the artifact store.
        device: ``auto``, ``cpu`` or ``cuda``.
        placement: the profile's placement; the packed export must fit one device's budget.
        image_text_rows: held-out image-text rows scored on their answer tokens, or None.
        image_text_source: their source settings, with ``image_text_rows``.

    Returns:
        An ``eval-report`` artifact (``eval_report.json``, ``eval_report.md``); ``meta`` holds the
        metrics of :func:`quantdag.evaluation.logprobs.summarise` plus ``checkpoint_bytes``,
        ``base_bytes``, ``bits_per_parameter``, ``seconds``, ``model_loads`` (1: the export),
        ``peak_gpu_bytes`` and ``peak_rss_bytes``.

    Raises:
        ValueError: the packed export does not fit the memory budget of one device, or the
            reference does not match the rows (a different number of rows or positions).
    """
    from safetensors.torch import load_file

    from quantdag.format.reader import load_nvfp4_model

    start = time.perf_counter()
    with step_meter() as meter:
        warm.release()  # a model kept by calibration gives its memory back before the export is read
        torch_device = devices.pick_device(device)
        quantized_bytes = checkpoint.meta.get("safetensors_bytes") or sum(
            size for name, size in checkpoint.files.items() if name.endswith(".safetensors"))
        _check_fits(quantized_bytes, torch_device, placement)
        tensors = load_file(str(store.local_dir(reference) / REFERENCE_FILE))
        model = load_nvfp4_model(store.local_dir(checkpoint), dtype=warm.compute_dtype(torch_device),
                                 device=torch_device, packed=True).model
        modeling.count_model_load()
        totals: dict[str, float] = {}
        windows = tensors["text.ids"]
        with torch.no_grad(), Progress("evaluate", windows.shape[0], key="evaluate") as bar:
            for index in range(windows.shape[0]):
                ids = windows[index][None].to(torch_device)
                record = {key: tensors[f"text.{key}"][index] for key in RECORD_KEYS}
                totals = add(totals, compare_to_reference(record, model(input_ids=ids, use_cache=False).logits, ids))
                bar.update()
            answers: dict[str, float] = {}
            if image_text_rows is not None and image_text_source is not None:
                rows_dir, rows = read_rows(store, image_text_rows)
                offsets, stats = tensors["image_text.offsets"], {}
                if offsets.numel() != len(rows) + 1:
                    raise ValueError(f"reference {reference.uri} scores {offsets.numel() - 1} rows, the held-out set has {len(rows)}")
                for index, (batch, first) in enumerate(answer_inputs(base, rows_dir, rows, image_text_source, torch_device)):
                    span = slice(int(offsets[index]), int(offsets[index + 1]))
                    record = {key: tensors[f"image_text.{key}"][span] for key in RECORD_KEYS}
                    logits = model(**batch, use_cache=False).logits
                    stats = add(stats, compare_to_reference(record, logits, batch["input_ids"], start=first))
                answers = {**summarise(stats, prefix="image_text_"), "image_text_rows": float(len(rows))}
        del model
    params = reference.meta["parameters"]
    metrics = {
        **summarise(totals),
        **answers,
        "checkpoint_bytes": float(quantized_bytes),
        "base_bytes": float(params * 2),
        "bits_per_parameter": 8.0 * quantized_bytes / params,
        "size_ratio_vs_bf16": quantized_bytes / (params * 2),
        "seconds": time.perf_counter() - start,
        **meter.figures,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "eval_report.json").write_text(json.dumps({"metrics": metrics, "eval": spec.model_dump()}, indent=1))
        (out / "eval_report.md").write_text(report_markdown(metrics, spec))
        return store.put_dir(out, REPORT_KIND, metrics)


def _check_fits(quantized_bytes: int, device: torch.device, placement: PlacementSpec) -> None:
    """Raise ValueError when the packed export exceeds the room of one device's memory budget."""
    if device.type != "cuda" or placement.memory_budget_gib is None:
        return
    room = placement.memory_budget_gib * (1 - placement.reserve_fraction) * (1 << 30)
    if quantized_bytes > room:
        raise ValueError(
            f"evaluate: the packed export needs {quantized_bytes / (1 << 30):.1f} GiB, more than "
            f"{room / (1 << 30):.1f} GiB of placement.memory_budget_gib={placement.memory_budget_gib} "
            f"(reserve_fraction={placement.reserve_fraction}); raise the budget for evaluation")


def report_markdown(metrics: dict[str, float], spec: EvalSpec) -> str:
    """A small markdown table of the evaluation metrics."""
    rows = "\n".join(f"| {name} | {value:.6g} |" for name, value in metrics.items())
    source = spec.path or f"{spec.repo_id}/{spec.config}/{spec.split}"
    return (f"# NVFP4 vs BF16\n\nHeld-out text: `{source}`, {spec.max_windows} windows x {spec.seq_len} tokens "
            f"(NVFP4 read from the exported files, scored against the stored BF16 reference).\n\n| metric | value |\n|---|---|\n{rows}\n")


@quantdag_task("evaluate", model_step=True)
def evaluate_task(base: BaseRef, checkpoint: ArtifactRef, reference: ArtifactRef, spec: EvalSpec, artifact_store: str,
                  device: str, code_version: str, placement: PlacementSpec = PlacementSpec(),
                  image_text_rows: ArtifactRef | None = None,
                  image_text_source: ImageTextSource | None = None) -> ArtifactRef:
    """Prefect wrapper of :func:`evaluate` (``placement`` is not part of the cache key)."""
    return evaluate(base, checkpoint, reference, spec, ArtifactStore(artifact_store), device, placement,
                    image_text_rows, image_text_source)
