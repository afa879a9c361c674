"""BF16 reference step: the base's next-token predictions on the held-out data, once per base and data.

Evaluation compares the exported NVFP4 checkpoint with its BF16 base. Holding both models at once
costs twice the weights (four times in float32: 216 GB for Qwen3.6-27B), so the base runs here,
alone, and what the comparison needs of it is stored as an artifact of its own
(:func:`quantdag.evaluation.logprobs.reference_record` per window and per held-out image-text row:
target log-probability, top-k ids and log-probabilities). Its cache key is the base's identity,
the evaluation spec and the held-out rows, not the recipe or the calibration, so a rerun or a
second recipe reuses it as a cache hit. The model it ran is left for calibration
(:mod:`quantdag.model.warm`): the run loads the base once for both.

The artifact (``reference.safetensors`` + ``reference.json``):

- ``text.ids`` int64 ``[W, seq_len]``: the evaluation windows (evaluate runs exactly these);
- ``text.target_logprob`` float32 ``[W, seq_len - 1]``, ``text.top_logprob`` float32
  ``[W, seq_len - 1, k]``, ``text.top_ids`` int32 ``[W, seq_len - 1, k]``, ``text.rest_logprob``
  float32 ``[W, seq_len - 1]`` (log of the probability outside the top k);
- for held-out image-text rows, the same over answer tokens, rows concatenated along positions:
  ``image_text.target_logprob [N]``, ``image_text.top_logprob [N, k]``, ``image_text.top_ids
  [N, k]``, ``image_text.rest_logprob [N]``, ``image_text.offsets`` int64 ``[R + 1]`` (row r is ``offsets[r]:offsets[r+1]``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from conf.schema import EvalSpec, ImageTextSource, PlacementSpec
from quantdag.evaluation.logprobs import REFERENCE_FILE, TOP_K, add, reference_record, summarise
from quantdag.model import warm
from quantdag.model.loading import BaseRef, load_tokenizer
from quantdag.model.placement import placement_record
from quantdag.runtime import devices
from quantdag.runtime.measure import step_meter
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.progress import Progress
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.evaluate import answer_inputs, eval_windows, load_eval_text
from tasks.fetch import read_rows

REFERENCE_KIND = "bf16-reference"


def _stack(records: list[dict[str, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": torch.stack([r[key] for r in records]) for key in records[0]}


def _concat(records: list[dict[str, torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0] + [r["target_logprob"].shape[0] for r in records], dtype=torch.int64)
    return {**{f"{prefix}.{key}": torch.cat([r[key] for r in records]) for key in records[0]},
            f"{prefix}.offsets": lengths.cumsum(0)}


def bf16_reference(base: BaseRef, spec: EvalSpec, store: ArtifactStore, device: str = "auto",
                   placement: PlacementSpec = PlacementSpec(), image_text_rows: ArtifactRef | None = None,
                   image_text_source: ImageTextSource | None = None, top_k: int = TOP_K) -> ArtifactRef:
    """Run the BF16 base over the evaluation windows (and held-out image-text rows) and store the record.

    Args:
        base: the resolved base.
        spec: the evaluation spec (text source, ``seq_len``, ``max_windows``).
        store: where the record goes.
        device: ``auto``, ``cpu`` or ``cuda``; BF16 compute on a GPU, float32 on the CPU.
        placement: the profile's placement (memory budget per device).
        image_text_rows: held-out image-text rows (never calibration rows), or None.
        image_text_source: their source settings (image size cap), with ``image_text_rows``.
        top_k: reference tokens kept per position.

    Returns:
        A ``bf16-reference`` artifact; ``meta`` has ``parameters`` (of the loaded model),
        ``windows``, ``top_k``, the BF16 perplexity, ``seconds``, ``load_seconds``,
        ``model_loads``, ``peak_gpu_bytes``, ``peak_rss_bytes`` and the placement.

    Raises:
        ValueError: the evaluation text is too short (see ``tasks.evaluate.eval_windows``).
    """
    start = time.perf_counter()
    with step_meter() as meter:
        torch_device = devices.pick_device(device)
        windows = eval_windows(load_eval_text(spec), load_tokenizer(base), spec)
        held = warm.base_model(base, torch_device, placement)
        if held.stage != "bf16":  # quantizers inserted by an earlier step of this process: start from the files
            del held
            held = warm.base_model(base, torch_device, placement)
        model, device_in = held.model, held.placement.device
        text_records, totals = [], {}
        with torch.no_grad(), Progress("reference", windows.shape[0], key="reference") as bar:
            for window in windows:
                ids = window[None].to(device_in)
                record = reference_record(model(input_ids=ids, use_cache=False).logits, ids, top_k=top_k)
                text_records.append(record)
                totals = add(totals, {"nll_ref": -float(record["target_logprob"].double().sum()),
                                      "tokens": float(record["target_logprob"].numel())})
                bar.update()
            tensors = {"text.ids": windows.contiguous(), **_stack(text_records, "text")}
            rows_count = 0
            if image_text_rows is not None and image_text_source is not None:
                rows_dir, rows = read_rows(store, image_text_rows)
                answers = [reference_record(model(**batch, use_cache=False).logits, batch["input_ids"], start=first,
                                            top_k=top_k)
                           for batch, first in answer_inputs(base, rows_dir, rows, image_text_source, device_in)]
                tensors |= _concat(answers, "image_text")
                rows_count = len(answers)
        parameters, where = sum(p.numel() for p in model.parameters()), placement_record(held.placement)
        warm.keep(held.key, model, "bf16")
        del model, held
    metrics = {
        "parameters": float(parameters), "windows": float(windows.shape[0]), "seq_len": float(spec.seq_len),
        "top_k": float(top_k), "image_text_rows": float(rows_count),
        "perplexity_bf16": summarise({**totals, "nll_cand": totals["nll_ref"], "kl": 0.0, "agree": 0.0})["perplexity_bf16"],
        "seconds": time.perf_counter() - start, **meter.figures,
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / REFERENCE_FILE))
        (out / "reference.json").write_text(json.dumps({"metrics": metrics, "eval": spec.model_dump()}, indent=1))
        return store.put_dir(out, REFERENCE_KIND, {**metrics, **where})


@quantdag_task("bf16_reference", model_step=True)
def bf16_reference_task(base: BaseRef, spec: EvalSpec, artifact_store: str, device: str, code_version: str,
                        placement: PlacementSpec = PlacementSpec(), image_text_rows: ArtifactRef | None = None,
                        image_text_source: ImageTextSource | None = None) -> ArtifactRef:
    """Prefect wrapper of :func:`bf16_reference` (cached on the base, the eval spec and the held-out rows)."""
    return bf16_reference(base, spec, ArtifactStore(artifact_store), device, placement, image_text_rows,
                          image_text_source)
