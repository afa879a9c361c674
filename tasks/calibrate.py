"""Calibration steps: load the BF16 base, insert quantizers, run a forward loop, save the state.

Two forward loops (:data:`CALIBRATORS`):

- ``image_text``: each row goes through the base's processor (chat template -> ``input_ids`` with
  ``<|image_pad|>`` placeholders, ``pixel_values``, ``image_grid_thw``) and then the FULL VLM
  forward: vision tower -> projector -> language model with the real vision embeddings. Batch 1;
  only text tokens after the last image are ever cut, image tokens never.
- ``text``: each row's text is tokenized, cut to ``seq_len`` tokens and run through the language
  model alone (no vision tower, no lm_head).

Only the quantizer state is written (``quantdag.calibration.quantizer_state``), never the model.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from conf.schema import ImageTextSource, RecipeSpec, TextSource
from quantdag.model import loading as modeling
from quantdag.calibration.fast_max import ForwardLoop, fast_max_loop
from quantdag.model.loading import BaseRef
from quantdag.runtime.progress import Progress
from quantdag.calibration.quantizer_state import amax_summary, collect_state, require_valid_inputs, save_state
from quantdag.calibration.recipe import build_quant_config
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.fetch import read_rows
from quantdag.runtime.prefect_task import quantdag_task

STATE_KIND = "quantizer-state"


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
    ``vision_forward_calls`` and ``vision_embeddings`` (merged patch embeddings produced).
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


def calibrate(kind: str, base: BaseRef, rows_ref: ArtifactRef, recipe: RecipeSpec,
              source: ImageTextSource | TextSource, store: ArtifactStore, device: str = "auto",
              shard: int = 0, num_shards: int = 1, fast: bool = True) -> ArtifactRef:
    """Calibrate the base on one rows artifact and store the quantizer state.

    Args:
        kind: ``image_text`` or ``text`` (a key of :data:`CALIBRATORS`).
        base: the resolved base checkpoint.
        rows_ref: rows from the matching fetch step.
        recipe: the quantization recipe.
        source: the calibration source settings (sequence length, image size cap).
        store: where the state goes.
        device: ``auto``, ``cpu`` or ``cuda``.
        shard, num_shards: calibrate on rows ``shard::num_shards`` only; the max-merge of all
            shards' states equals one pass over every row, bit for bit (each row runs alone).
        fast: run the loop under :func:`quantdag.calibration.fast_max.fast_max_loop` (same amax, fewer kernels).

    Returns:
        A ``quantizer-state`` artifact (``quantizer_state.pt`` + ``metrics.json``); ``meta`` holds
        the metrics: rows, tokens, seconds (load, calibrate), tokens_per_second, amax statistics,
        and for image_text the vision-tower counts.

    Raises:
        ValueError: unknown ``kind``; a shard outside ``range(num_shards)`` or with no rows; or
            enabled input quantizers ended without a usable amax (each module named).
        RuntimeError: image_text calibration did not run the vision tower.
    """
    if kind not in CALIBRATORS:
        raise ValueError(f"calibration kind {kind!r}: expected one of {sorted(CALIBRATORS)}")
    torch_device = modeling.pick_device(device)
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside range(num_shards={num_shards})")
    rows_dir, rows = read_rows(store, rows_ref)
    rows = rows[shard::num_shards]
    if not rows:
        raise ValueError(f"{kind} shard {shard} of {num_shards} has no rows: lower {kind}.shards below num_samples")
    stats: dict[str, float] = {"rows": 0, "tokens": 0, "image_tokens": 0, "vision_forward_calls": 0, "vision_embeddings": 0}
    loop = CALIBRATORS[kind](base, rows_dir, rows, source, torch_device, stats)
    # CPUs have no fast BF16 matmul: there the BF16 weights are upcast (exactly) and activations
    # run in float32, so input amax carry no BF16 rounding; on CUDA the model runs in BF16.
    loaded = modeling.load_model(base, torch_device)
    if torch_device.type == "cpu":
        loaded.model.float()
    import modelopt.torch.quantization as mtq

    start = time.perf_counter()
    model = mtq.quantize(loaded.model, build_quant_config(recipe), forward_loop=fast_max_loop(loop) if fast else loop)
    seconds = time.perf_counter() - start
    if kind == "image_text":
        check_vision(stats)
    state = collect_state(model)
    require_valid_inputs(state, where=f"calibrate_{kind}")
    metrics = {
        **stats,
        "load_seconds": loaded.load_seconds,
        "calibrate_seconds": seconds,
        "tokens_per_second": stats["tokens"] / seconds if seconds else 0.0,
        **amax_summary(state),
    }
    if kind == "text":
        for key in ("image_tokens", "vision_forward_calls", "vision_embeddings"):
            metrics.pop(key)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_state(state, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return store.put_dir(out, STATE_KIND, {"kind": kind, "shard": shard, "num_shards": num_shards, **metrics})


CALIBRATORS: dict[str, Callable[..., ForwardLoop]] = {
    "image_text": image_text_loop,
    "text": lambda base, rows_dir, rows, source, device, stats: text_loop(base, rows, source, device, stats),
}


@quantdag_task("calibrate_image_text")
def calibrate_image_text_task(base: BaseRef, rows: ArtifactRef, recipe: RecipeSpec, source: ImageTextSource,
                              artifact_store: str, device: str, code_version: str, shard: int = 0,
                              num_shards: int = 1) -> ArtifactRef:
    """Prefect wrapper of :func:`calibrate` for image-text rows through the full VLM."""
    return calibrate("image_text", base, rows, recipe, source, ArtifactStore(artifact_store), device, shard, num_shards)


@quantdag_task("calibrate_text")
def calibrate_text_task(base: BaseRef, rows: ArtifactRef, recipe: RecipeSpec, source: TextSource,
                        artifact_store: str, device: str, code_version: str, shard: int = 0,
                        num_shards: int = 1) -> ArtifactRef:
    """Prefect wrapper of :func:`calibrate` for text rows through the language model."""
    return calibrate("text", base, rows, recipe, source, ArtifactStore(artifact_store), device, shard, num_shards)
