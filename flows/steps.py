"""DAG pieces that the quantize and compare flows both wire: the calibration a recipe list needs, and one recipe's steps.

After the shared steps (fetch, BF16 reference, calibrate, merge_amax), a recipe is::

    [hessian] -> [weight_scales] -> export -> audit, evaluate

A recipe that is the calibration's own recipe (NVFP4 W4A4 everywhere with max weight scales, the
same exclusions and KV cache: ``quantdag.calibration.recipe.exports_calibration``; the reference
recipe in a quantize run) exports the merged calibration state as it is: today's quantize DAG,
same steps and cache keys. Any other recipe gets its quantizer state from ``weight_scales`` over
the calibration of ``calibration_recipe`` (which serves every recipe of a list), after
``hessian`` when its weight scales are ``local_hessian``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conf.schema import Profile, RecipeSpec
from quantdag.calibration.recipe import calibrates_directly, calibration_recipe, exports_calibration
from tasks.audit import audit_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.hessian import hessian_task
from tasks.weight_scales import weight_scales_task

RECIPE_STEPS = ("hessian", "weight_scales", "export", "audit", "evaluate")
"""The steps of one recipe, in order; the first two only when the recipe needs them."""


def calibration_profile(profile: Profile, recipes: Sequence[RecipeSpec] = ()) -> Profile:
    """``profile`` with the recipe its calibration steps run: one calibration for all of ``recipes``.

    ``recipes`` defaults to ``[profile.recipe]``. A single recipe that calibrates directly keeps its
    own recipe (the quantize flow's cache keys stay what they were); otherwise the recipe is
    :func:`quantdag.calibration.recipe.calibration_recipe` of the list.
    """
    recipes = list(recipes) or [profile.recipe]
    if len(recipes) == 1 and calibrates_directly(recipes[0]):
        return profile.model_copy(update={"recipe": recipes[0]})
    return profile.model_copy(update={"recipe": calibration_recipe(recipes)})


def submit_recipe(recipe: RecipeSpec, profile: Profile, base: Any, futures: dict[str, Any], merged: Any,
                  calibration: RecipeSpec, cv: str, heldout: Any = None, wait_for: Sequence[Any] = ()) -> dict[str, Any]:
    """Submit one recipe's steps (:data:`RECIPE_STEPS`) after the shared ones; returns step name -> future.

    Args:
        recipe: the recipe.
        profile: the run's profile (store, device, placement, eval, calibration sources).
        base: the resolved base.
        futures: the shared steps' futures (``fetch_text``, ``fetch_image_text`` when the base is a
            VLM, ``bf16_reference``).
        merged: the future of ``merge_amax`` over the calibration of :func:`calibration_profile`.
        calibration: the recipe that calibration ran (``calibration_profile(...).recipe``).
        cv: the code version that keys every cache.
        heldout: the held-out image-text rows' future, or None.
        wait_for: futures the recipe's first model step waits for (the previous recipe's export).
    """
    store, device, placement = profile.artifact_store, profile.device, profile.placement
    steps: dict[str, Any] = {}
    state = merged
    if not exports_calibration(recipe, calibration):
        hessians = None
        if recipe.needs_hessian:
            kinds = [kind for kind in ("image_text", "text") if f"fetch_{kind}" in futures]
            steps["hessian"] = hessians = hessian_task.submit(
                base, {kind: futures[f"fetch_{kind}"] for kind in kinds}, merged, recipe,
                {kind: getattr(profile, kind) for kind in kinds}, store, device, cv, placement, wait_for=list(wait_for))
        steps["weight_scales"] = state = weight_scales_task.submit(
            base, merged, recipe, store, device, cv, placement, hessians, wait_for=list(wait_for))
    steps["export"] = export_task.submit(base, state, recipe, store, device, cv, placement, wait_for=list(wait_for))
    steps["audit"] = audit_task.submit(base, steps["export"], store, cv)
    steps["evaluate"] = evaluate_task.submit(base, steps["export"], futures["bf16_reference"], profile.eval, store,
                                             device, cv, placement, heldout, profile.image_text if heldout else None)
    return steps
