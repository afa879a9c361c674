"""Weight-scale step: one recipe's quantizer state, from the shared calibration (and its Hessians).

The merged max calibration (``tasks/calibrate.py`` + ``tasks/merge.py`` of
``quantdag.calibration.recipe.calibration_recipe``) holds the input amax of every recipe that
max-calibrates its activations. This step gives the base the recipe's quantizers, those input
amax, and the recipe's weight scales (``max``; ``mse``: ModelOpt's search over the E4M3 block
scales; ``local_hessian``: the same search weighted by the Hessians of ``tasks/hessian.py``), then
stores a quantizer state exactly like calibration's, which export reads. Weight scales come from
the weights (and Hessians) alone, so the step runs no calibration data. The model is kept for
export (``quantdag.model.warm``): no reload between the two.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from conf.schema import PlacementSpec, RecipeSpec
from quantdag.calibration.quantizer_state import STATE_FILE, collect_state, load_state, require_valid_inputs, save_state
from quantdag.calibration.weight_scales import HESSIAN_FILE, load_hessians, quantize_for_recipe
from quantdag.model import warm
from quantdag.model.loading import BaseRef
from quantdag.model.placement import placement_record
from quantdag.runtime import devices
from quantdag.runtime.measure import step_meter
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.store import ArtifactRef, ArtifactStore

STATE_KIND = "quantizer-state"


def recipe_state(base: BaseRef, calibration: ArtifactRef, recipe: RecipeSpec, store: ArtifactStore,
                 device: str = "auto", placement: PlacementSpec = PlacementSpec(),
                 hessians: ArtifactRef | None = None) -> ArtifactRef:
    """Store ``recipe``'s quantizer state: its quantizers, the shared input amax, its weight scales.

    The model is the one the hessian step left (the recipe's quantizers, max weight amax) when
    there is one, else the kept or loaded BF16 base.

    Args:
        base: the resolved base.
        calibration: the merged max-calibration state (``merge_amax``).
        recipe: the recipe.
        store: where the state goes.
        device: ``auto``, ``cpu`` or ``cuda``.
        placement: the profile's placement; not part of the result.
        hessians: the ``hessians`` artifact of ``tasks/hessian.py`` for this recipe (local_hessian only).

    Returns:
        A ``quantizer-state`` artifact (``quantizer_state.pt`` + ``metrics.json``), the layout of
        calibration's, which export reads; ``meta`` holds ``recipe``, ``weight_scale``,
        ``weight_quantizers``, ``input_quantizers``, ``seconds``, ``load_seconds``,
        ``model_loads``, the peaks and the placement.

    Raises:
        ValueError: a local_hessian recipe without ``hessians`` (or the reverse), or the
            calibration lacks an input amax the recipe needs (modules named).
    """
    if recipe.needs_hessian != (hessians is not None):
        raise ValueError(f"recipe {recipe.name} (weight_scale {recipe.weight_scale}): pass the hessian step's "
                         "artifact exactly when weight_scale is local_hessian")
    start = time.perf_counter()
    with step_meter() as meter:
        torch_device = devices.pick_device(device)
        held = warm.base_model(base, torch_device, placement)
        ready = held.stage == "quantized" and held.note.get("recipe") == recipe.model_dump_json() \
            and held.note.get("weights") == "max"
        if held.stage != "bf16" and not ready:  # quantizers of another recipe, or searched scales
            del held
            warm.release()
            held = warm.base_model(base, torch_device, placement)
        load_seconds, loaded, where = held.load_seconds, held.loaded, placement_record(held.placement)
        state = load_state(store.local_dir(calibration) / STATE_FILE)
        stats = load_hessians(store.local_dir(hessians) / HESSIAN_FILE) if hessians is not None else None
        model = quantize_for_recipe(held.model, recipe, state, stats, quantized=ready)
        result = collect_state(model)
        require_valid_inputs(result, where=f"weight_scales[{recipe.name}]")
        warm.keep(held.key, model, "quantized", recipe=recipe.model_dump_json(), weights=recipe.weight_scale)
        del model, held
    metrics = {"seconds": time.perf_counter() - start, "load_seconds": load_seconds,
               "model_loads": 1.0 if loaded else 0.0,
               "weight_quantizers": float(sum(n.endswith("weight_quantizer") for n in result["amax"])),
               "input_quantizers": float(len(result["input_quantizers"])),
               **{k: v for k, v in meter.figures.items() if k != "model_loads"}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_state(result, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return store.put_dir(out, STATE_KIND, {"recipe": recipe.name, "weight_scale": recipe.weight_scale,
                                               **metrics, **where})


def run_name(parameters: dict[str, Any]) -> str:
    """Task-run name: ``weight_scales[<recipe name>]``."""
    return f"weight_scales[{parameters['recipe'].name}]"


@quantdag_task("weight_scales", model_step=True, task_run_name=run_name)
def weight_scales_task(base: BaseRef, calibration: ArtifactRef, recipe: RecipeSpec, artifact_store: str, device: str,
                       code_version: str, placement: PlacementSpec = PlacementSpec(),
                       hessians: ArtifactRef | None = None) -> ArtifactRef:
    """Prefect wrapper of :func:`recipe_state` (``placement`` is not part of the cache key)."""
    return recipe_state(base, calibration, recipe, ArtifactStore(artifact_store), device, placement, hessians)
