"""Hessian step: the per-layer local Hessians that a recipe's ``local_hessian`` weight-scale search needs.

For one recipe, the base gets the recipe's quantizers and the shared calibration's input amax
(``quantdag.calibration.weight_scales.insert_quantizers``), then one forward pass over the
calibration rows of every branch (the same loops as ``tasks/calibrate.py``: image-text rows
through the full VLM, text rows through the language model) sums ``XᵀX`` per 16-wide input block
of every quantized linear, with weight fake quantization off and the recipe's input quantizers on
(``collect_hessians``). The step stores only the Hessians (``hessians.safetensors``:
``float32 [in/16, 16, 16]`` per linear, 64 bytes per input feature, with token counts), cached per
recipe, base and rows; the model, holding the recipe's quantizers, is left for the weight-scale
step (``tasks/weight_scales.py``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from conf.schema import ImageTextSource, PlacementSpec, RecipeSpec, TextSource
from quantdag.calibration.quantizer_state import STATE_FILE, load_state
from quantdag.calibration.weight_scales import collect_hessians, insert_quantizers, save_hessians
from quantdag.model import warm
from quantdag.model.loading import BaseRef
from quantdag.model.placement import placement_record
from quantdag.runtime import devices
from quantdag.runtime.measure import step_meter
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.calibrate import CALIBRATORS, check_vision, empty_stats
from tasks.fetch import read_rows

HESSIAN_KIND = "hessians"


def collect_recipe_hessians(base: BaseRef, rows: dict[str, ArtifactRef], calibration: ArtifactRef, recipe: RecipeSpec,
                            sources: dict[str, ImageTextSource | TextSource], store: ArtifactStore,
                            device: str = "auto", placement: PlacementSpec = PlacementSpec()) -> ArtifactRef:
    """Gather and store the local Hessians of ``recipe``'s quantized linears over every calibration branch.

    Args:
        base: the resolved base.
        rows: branch kind (``image_text``, ``text``) -> rows artifact of its fetch step.
        calibration: the merged max-calibration state (``merge_amax``) whose input amax the
            recipe's input quantizers take.
        recipe: a recipe with ``weight_scale: local_hessian``.
        sources: branch kind -> its calibration source settings.
        store: where the Hessians go.
        device: ``auto``, ``cpu`` or ``cuda``.
        placement: the profile's placement (memory budget); not part of the result.

    Returns:
        A ``hessians`` artifact (``hessians.safetensors``); ``meta`` holds ``recipe``, ``linears``,
        ``rows``, ``tokens``, ``seconds``, ``load_seconds``, ``model_loads``, the peaks and the placement.

    Raises:
        ValueError: the recipe does not use local_hessian, a branch has no source, the calibration
            lacks an input amax the recipe needs, or a quantized linear never ran (all named).
        RuntimeError: the image-text pass did not run the vision tower.
    """
    if not recipe.needs_hessian:
        raise ValueError(f"recipe {recipe.name}: weight_scale is {recipe.weight_scale!r}; only local_hessian uses Hessians")
    missing = sorted(set(rows) - set(sources))
    if missing:
        raise ValueError(f"hessian: branches {missing} have rows but no source")
    torch_device = devices.pick_device(device)
    stats = {kind: empty_stats() for kind in rows}
    loops = []
    for kind, ref in rows.items():
        rows_dir, kind_rows = read_rows(store, ref)
        loops.append(CALIBRATORS[kind](base, rows_dir, kind_rows, sources[kind], torch_device, stats[kind]))

    def every_branch(model: torch.nn.Module) -> None:
        for loop in loops:
            loop(model)

    start = time.perf_counter()
    with step_meter() as meter:
        held = warm.base_model(base, torch_device, placement)
        if held.stage != "bf16":  # quantizers of some recipe: start from the files
            del held
            warm.release()
            held = warm.base_model(base, torch_device, placement)
        load_seconds, loaded, where = held.load_seconds, held.loaded, placement_record(held.placement)
        state = load_state(store.local_dir(calibration) / STATE_FILE)
        model = insert_quantizers(held.model, recipe, state)
        hessians = collect_hessians(model, every_branch)
        if "image_text" in stats:
            check_vision(stats["image_text"])
        warm.keep(held.key, model, "quantized", recipe=recipe.model_dump_json(), weights="max")
        del model, held
    meta = {"recipe": recipe.name, "linears": float(len(hessians)),
            "rows": float(sum(s["rows"] for s in stats.values())), "tokens": float(sum(s["tokens"] for s in stats.values())),
            "seconds": time.perf_counter() - start, "load_seconds": load_seconds, "model_loads": 1.0 if loaded else 0.0,
            **{k: v for k, v in meter.figures.items() if k != "model_loads"}, **where}
    with tempfile.TemporaryDirectory() as tmp:
        save_hessians(hessians, Path(tmp))
        return store.put_dir(tmp, HESSIAN_KIND, meta)


def run_name(parameters: dict[str, Any]) -> str:
    """Task-run name: ``hessian[<recipe name>]``."""
    return f"hessian[{parameters['recipe'].name}]"


@quantdag_task("hessian", model_step=True, task_run_name=run_name)
def hessian_task(base: BaseRef, rows: dict[str, ArtifactRef], calibration: ArtifactRef, recipe: RecipeSpec,
                 sources: dict[str, ImageTextSource | TextSource], artifact_store: str, device: str, code_version: str,
                 placement: PlacementSpec = PlacementSpec()) -> ArtifactRef:
    """Prefect wrapper of :func:`collect_recipe_hessians` (``placement`` is not part of the cache key)."""
    return collect_recipe_hessians(base, rows, calibration, recipe, sources, ArtifactStore(artifact_store), device,
                                   placement)
