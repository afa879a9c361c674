"""Calibration step: load the BF16 base once, calibrate one or more branches, save one state each.

One call takes rows per branch (``image_text``, ``text``: :data:`CALIBRATORS`) and returns a
quantizer state per branch label: the branch kind, or ``kind[i]`` for shard ``i`` of a branch
split into shards (:func:`branch_label`). The same step serves every layout the flow
makes (:func:`calibration_calls`): all branches in one call on one model load, or one call per
branch shard, in the flow's process or in a pool of worker processes with a GPU each.

On the one load the first branch runs ``mtq.quantize``; every later branch is reset and
re-calibrated (``quantdag.calibration.session``), so each branch's state equals what a call of
its own writes. The data loops run under :func:`quantdag.calibration.fast_max.fast_max_loop`
(ModelOpt's amax, fewer kernels). Only the quantizer state is written
(``quantdag.calibration.quantizer_state``), never the model.

The two forward loops:

- ``image_text``: each row goes through the base's processor (chat template -> ``input_ids`` with
  ``<|image_pad|>`` placeholders, ``pixel_values``, ``image_grid_thw``) and then the FULL VLM
  forward: vision tower -> projector -> language model with the real vision embeddings. Batch 1;
  only text tokens after the last image are ever cut, image tokens never.
- ``text``: each row's text is tokenized, cut to ``seq_len`` tokens and run through the language
  model alone (no vision tower, no lm_head).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from conf.schema import ImageTextSource, PlacementSpec, RecipeSpec, TextSource
from quantdag.calibration.fast_max import ForwardLoop, fast_max_loop
from quantdag.calibration.quantizer_state import amax_summary, collect_state, require_valid_inputs, save_state
from quantdag.calibration.recipe import build_quant_config
from quantdag.calibration.session import recalibrate, reset_calibration
from quantdag.model import loading as modeling
from quantdag.model import warm
from quantdag.model.loading import BaseRef
from quantdag.model.placement import placement_record
from quantdag.runtime import devices
from quantdag.runtime.measure import step_meter
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.progress import Progress
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.calibration_split import (Shard, Shards, Unit, branch_label, calibration_calls, call_labels,  # noqa: F401
                                     check_call, shard_units)
from tasks.fetch import read_rows

STATE_KIND = "quantizer-state"

PRELOAD_NOTE = "preload_seconds"
"""Note of a model that ``tasks.preload`` kept (:func:`quantdag.model.warm.keep`): its load's seconds."""

VISION_STATS = ("image_tokens", "vision_forward_calls", "vision_embeddings")
"""Statistics only the image-text loop fills."""


def empty_stats() -> dict[str, float]:
    """The counters a loop adds to: ``rows``, ``tokens`` and the :data:`VISION_STATS`, all 0."""
    return {"rows": 0, "tokens": 0, **dict.fromkeys(VISION_STATS, 0)}


def _downscale(image: Any, max_pixels: int) -> Any:
    width, height = image.size
    if width * height <= max_pixels:
        return image
    ratio = math.sqrt(max_pixels / (width * height))
    return image.resize((max(16, int(width * ratio)), max(16, int(height * ratio))))


def chat_messages(root: Path, row: dict[str, Any], max_image_pixels: int) -> tuple[list[dict[str, Any]], list[Any]]:
    """A stored row as processor chat messages (image parts as ``{"type": "image"}``) and its
    RGB PIL images in order, each downscaled to at most ``max_image_pixels`` pixels."""
    from PIL import Image

    images, messages = [], []
    for message in row["messages"]:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for part in content:
            if part.get("type") == "image":
                with Image.open(root / part["image"]) as image:
                    images.append(_downscale(image.convert("RGB"), max_image_pixels))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return messages, images


def _processor_inputs(processor: Any, root: Path, row: dict[str, Any], source: ImageTextSource) -> dict[str, torch.Tensor]:
    """Processor outputs for one row: input_ids [1, T], pixel_values [P, C*t*p*p], image_grid_thw [N, 3]."""
    messages, images = chat_messages(root, row, source.max_image_pixels)
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    return _cut_text(dict(inputs), processor, source.max_text_tokens)


def _cut_text(inputs: dict[str, torch.Tensor], processor: Any, max_text_tokens: int) -> dict[str, torch.Tensor]:
    ids = inputs["input_ids"][0]
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    is_image = ids == image_token
    text_tokens = int((~is_image).sum())
    if text_tokens <= max_text_tokens:
        return inputs
    last_image = int(is_image.nonzero().max()) + 2 if is_image.any() else 0  # keep <|vision_end|>
    keep = max(last_image, int(ids.numel()) - (text_tokens - max_text_tokens))
    length = ids.numel()
    return {k: (v[:, :keep] if v.dim() == 2 and v.shape[1] == length and k != "pixel_values" else v) for k, v in inputs.items()}


class _VisionCounter:
    """Counts vision-tower forward calls and the merged image embeddings they produced."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.embeddings = 0
        visual = getattr(getattr(model, "model", None), "visual", None)
        if visual is None:
            raise TypeError(f"{type(model).__name__} has no model.visual: not a vision-language model")
        self.handle = visual.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        pooled = getattr(output, "pooler_output", output)
        self.embeddings += int(pooled.shape[0]) if isinstance(pooled, torch.Tensor) else 0


def image_text_loop(base: BaseRef, rows_dir: Path, rows: list[dict[str, Any]], source: ImageTextSource,
                    device: torch.device, stats: dict[str, float]) -> ForwardLoop:
    """Forward loop over image-text rows through the full VLM; fills ``stats`` as it runs.

    ``stats`` receives ``rows``, ``tokens``, ``image_tokens`` (``<|image_pad|>`` placeholders),
    ``vision_forward_calls`` and ``vision_embeddings`` (merged patch embeddings produced). The
    loop raises TypeError when the model it is given has no ``model.visual``.
    """
    processor = modeling.load_processor(base)
    prepared = [_processor_inputs(processor, rows_dir, row, source) for row in rows]
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def loop(model: torch.nn.Module) -> None:
        counter = _VisionCounter(model)
        try:
            with torch.no_grad(), Progress("calibrate image_text", len(prepared)) as bar:
                for inputs in prepared:
                    batch = {k: v.to(device) for k, v in inputs.items()}
                    model(**batch, use_cache=False, logits_to_keep=1)
                    stats["rows"] += 1
                    stats["tokens"] += int(inputs["input_ids"].numel())
                    stats["image_tokens"] += int((inputs["input_ids"] == image_token).sum())
                    bar.update()
        finally:
            counter.handle.remove()
        stats["vision_forward_calls"] += counter.calls
        stats["vision_embeddings"] += counter.embeddings

    return loop


def text_loop(base: BaseRef, rows: list[dict[str, Any]], source: TextSource, device: torch.device,
              stats: dict[str, float]) -> ForwardLoop:
    """Forward loop over text rows through the language model alone; fills ``stats``."""
    tokenizer = modeling.load_tokenizer(base)
    prepared = [
        tokenizer(row[source.text_field], return_tensors="pt", truncation=True, max_length=source.seq_len)["input_ids"]
        for row in rows
    ]

    def loop(model: torch.nn.Module) -> None:
        decoder = modeling.text_decoder(model)
        with torch.no_grad(), Progress("calibrate text", len(prepared)) as bar:
            for ids in prepared:
                decoder(input_ids=ids.to(device), use_cache=False)
                stats["rows"] += 1
                stats["tokens"] += int(ids.numel())
                bar.update()

    return loop


def check_vision(stats: dict[str, float]) -> None:
    """Raise RuntimeError when an image-text pass never ran the vision tower or lost image embeddings."""
    if stats["vision_forward_calls"] == 0 or stats["vision_embeddings"] == 0:
        raise RuntimeError(
            "calibrate_image_text: the vision tower never ran (0 forward calls or 0 image embeddings); "
            "the image-text rows did not reach model.visual"
        )
    if stats["vision_embeddings"] != stats["image_tokens"]:
        raise RuntimeError(
            f"calibrate_image_text: {stats['image_tokens']:.0f} <|image_pad|> tokens but the vision tower "
            f"produced {stats['vision_embeddings']:.0f} embeddings"
        )


CALIBRATORS: dict[str, Callable[..., ForwardLoop]] = {
    "image_text": image_text_loop,
    "text": lambda base, rows_dir, rows, source, device, stats: text_loop(base, rows, source, device, stats),
}
"""Branch kind -> loop builder ``(base, rows_dir, rows, source, device, stats) -> ForwardLoop``."""


def calibrate(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
              sources: dict[str, ImageTextSource | TextSource], store: ArtifactStore, device: str = "auto",
              shards: dict[str, Shards] | None = None, fast: bool = True,
              placement: PlacementSpec = PlacementSpec()) -> dict[str, ArtifactRef]:
    """Calibrate every branch (or branch shard) of the call on one load of the base; store one state each.

    The base is the model this process kept from its previous model step
    (:mod:`quantdag.model.warm`: the BF16 reference's, one loaded ahead by ``tasks.preload``, or
    an earlier calibration's with the same recipe), else it is loaded, placed within the memory
    budget (:mod:`quantdag.model.placement`). The calibrated model is kept for export.

    Args:
        base: the resolved base checkpoint.
        rows: branch kind (``image_text``, ``text``) -> rows artifact of its fetch step, in the
            order the branches run.
        recipe: the quantization recipe.
        sources: branch kind -> its calibration source settings (sequence length, image size cap).
        store: where the states go.
        device: ``auto``, ``cpu`` or ``cuda``.
        shards: branch kind -> ``(shard, num_shards)``: calibrate on that branch's rows
            ``shard::num_shards`` only (default ``(0, 1)``, every row); or a list of them, each
            calibrated from a clean slate on the same load (``tasks.calibration_split``). The
            max-merge of all shards' states equals one pass over every row, bit for bit (each
            row runs alone).
        fast: run the loops under :func:`quantdag.calibration.fast_max.fast_max_loop` (same
            amax, fewer kernels).
        placement: the profile's placement (memory budget per device); amax do not depend on it.

    Returns:
        Branch label (:func:`branch_label`) -> ``quantizer-state`` artifact
        (``quantizer_state.pt`` + ``metrics.json``). Its ``meta`` holds ``kind``, ``shard``,
        ``num_shards``, the placement and the metrics: rows, tokens, seconds (``load_seconds``, 0
        for every branch but the first; ``calibrate_seconds``), tokens_per_second, ``model_loads``
        (1 for the first branch when this call, or the preload before it, read the base, else 0),
        ``preloaded`` (1 when the base was loaded ahead of the call), ``shared_branches``
        (states on this load), ``peak_gpu_bytes`` / ``peak_rss_bytes`` of the call, amax
        statistics, and for image_text the vision-tower counts.

    Raises:
        ValueError: no branch, an unknown kind, a kind without its source, shards for a kind
            without rows, a shard outside ``range(num_shards)`` or listed twice (all of them named
            in one message), a shard with no rows, or an enabled input quantizer without a usable amax
            (each module named).
        RuntimeError: the image-text branch did not run the vision tower.
    """
    shards = dict(shards or {})
    check_call(rows, sources, shards, CALIBRATORS)
    torch_device = devices.pick_device(device)
    stats: dict[Unit, dict[str, float]] = {}
    loops: dict[Unit, ForwardLoop] = {}
    read = {kind: read_rows(store, ref) for kind, ref in rows.items()}
    for unit in shard_units(rows, shards):
        kind, shard, count = unit
        rows_dir, kind_rows = read[kind][0], read[kind][1][shard::count]
        if not kind_rows:
            raise ValueError(f"{kind} shard {shard} of {count} has no rows: lower {kind}.shards below num_samples")
        stats[unit] = empty_stats()
        loop = CALIBRATORS[kind](base, rows_dir, kind_rows, sources[kind], torch_device, stats[unit])
        loops[unit] = fast_max_loop(loop) if fast else loop
    with step_meter() as meter:
        held = _base_for(recipe, base, torch_device, placement)
        import modelopt.torch.quantization as mtq

        config, model, refs, where = build_quant_config(recipe), held.model, {}, placement_record(held.placement)
        preload_seconds = held.note.get(PRELOAD_NOTE)  # loaded ahead by tasks.preload: this call's load
        load_seconds = held.load_seconds if preload_seconds is None else float(preload_seconds)
        for index, ((kind, shard, count), loop) in enumerate(loops.items()):
            start = time.perf_counter()
            if index == 0 and held.stage == "bf16":
                model = mtq.quantize(model, config, forward_loop=loop)
            else:  # a later unit, or quantizers already inserted by an earlier call of this process
                reset_calibration(model)
                recalibrate(model, config["algorithm"], loop)
            seconds = time.perf_counter() - start
            unit_stats = stats[(kind, shard, count)]
            if kind == "image_text":
                check_vision(unit_stats)
            label = branch_label(kind, shard, count)
            state = collect_state(model)  # stored now: the next unit's reset changes what it refers to
            require_valid_inputs(state, where=f"calibrate_{label}")
            first = index == 0
            metrics = {**unit_stats, **meter.record(), "load_seconds": load_seconds if first else 0.0,
                       "model_loads": 1.0 if first and (held.loaded or preload_seconds is not None) else 0.0,
                       "preloaded": 1.0 if first and preload_seconds is not None else 0.0,
                       "shared_branches": float(len(loops)), "calibrate_seconds": seconds,
                       "tokens_per_second": unit_stats["tokens"] / seconds if seconds else 0.0, **amax_summary(state)}
            if kind != "image_text":
                for key in VISION_STATS:
                    metrics.pop(key)
            refs[label] = _store_state(state, metrics, store, {"kind": kind, "shard": shard, "num_shards": count, **where})
        warm.keep(held.key, model, "quantized", recipe=recipe.model_dump_json())  # export takes it: no reload
        del model, held
    return refs


def _base_for(recipe: RecipeSpec, base: BaseRef, device: torch.device, placement: PlacementSpec) -> warm.BaseModel:
    """The base for calibration: the model this process kept (BF16, or quantized with ``recipe``), else a load."""
    held = warm.base_model(base, device, placement)
    if held.stage == "quantized" and held.note.get("recipe") != recipe.model_dump_json():
        del held  # quantizers of another recipe: start from the files
        return warm.base_model(base, device, placement)
    return held


def _store_state(state: dict[str, Any], metrics: dict[str, float], store: ArtifactStore,
                 branch: dict[str, Any]) -> ArtifactRef:
    """Store ``quantizer_state.pt`` + ``metrics.json``; ``meta`` is ``branch`` plus the metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_state(state, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return store.put_dir(out, STATE_KIND, {**branch, **metrics})


def run_name(parameters: dict[str, Any]) -> str:
    """Task-run name of a call: ``calibrate_`` + its state labels joined by ``+``
    (``calibrate_image_text+text`` for one load of both, ``calibrate_text[1]`` for one shard,
    ``calibrate_image_text[0]+text[0]`` for the shards one GPU of a pool calibrates)."""
    return "calibrate_" + "+".join(call_labels(parameters["rows"], parameters.get("shards")))


@quantdag_task("calibrate", model_step=True, task_run_name=run_name)
def calibrate_task(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                   sources: dict[str, ImageTextSource | TextSource], artifact_store: str, device: str,
                   code_version: str, shards: dict[str, Shards] | None = None,
                   placement: PlacementSpec = PlacementSpec()) -> dict[str, ArtifactRef]:
    """Prefect wrapper of :func:`calibrate` (one model load for every branch of the call; ``placement``
    is not part of the cache key)."""
    return calibrate(base, rows, recipe, sources, ArtifactStore(artifact_store), device, shards, placement=placement)
