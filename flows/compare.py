"""The compare flow: one base, one calibration, several recipes, one table of quality against size.

    fetch_image_text(_heldout), fetch_text -> bf16_reference -> calibrate -> merge_amax
        -> per recipe: [hessian] -> [weight_scales] -> export -> audit, evaluate

Max calibration sees BF16 activations whatever the formats, so every recipe takes its input amax
from one calibration (of ``quantdag.calibration.recipe.calibration_recipe`` of the list): each
recipe calls the calibrate and merge steps, and every call after the first is a cache hit. The
BF16 reference is computed once. A recipe's own steps (``flows/steps.py``) then give it its
formats and weight scales, export, audit and evaluate it against the same reference. The MLflow
parent run has a child per recipe (``quantdag.runtime.comparison``); the comparison table is a
Prefect markdown artifact and, with the quality-against-size plot, an MLflow artifact.
Checkpoints are not registered: the flow compares, a quantize run of the chosen recipe ships.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from conf.schema import Profile, RecipeSpec
from flows.quantize import _calibrations, _heldout_image_text, _Output
from flows.steps import calibration_profile, submit_recipe
from quantdag.model.warm import release as release_kept_model
from quantdag.runtime.comparison import ComparisonLineage
from quantdag.runtime.deploy import with_revision
from quantdag.runtime.reaper import end_tracking_hook
from quantdag.runtime.store import ArtifactStore
from quantdag.runtime.version import code_version
from tasks.fetch import fetch_image_text_task, fetch_text_task
from tasks.merge import merge_amax_task
from tasks.preflight import preflight_task
from tasks.reap import reap_stale_runs_task
from tasks.reference import bf16_reference_task
from tasks.resolve import resolve_base_task
from tasks.scan import scan_base_task


def check_recipes(recipes: list[RecipeSpec]) -> list[RecipeSpec]:
    """The recipes, validated as a list: at least one, names unique.

    Raises:
        ValueError: no recipe, or names used twice (each named).
    """
    if not recipes:
        raise ValueError("compare: recipes is empty; give at least one recipe")
    names = [r.name for r in recipes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"compare: recipe names {twice} are used more than once; give every recipe its own name")
    return list(recipes)


@flow(name="compare", flow_run_name="compare-{profile.name}", log_prints=True, task_runner=ThreadPoolTaskRunner(),
      on_failure=[end_tracking_hook], on_crashed=[end_tracking_hook], on_cancellation=[end_tracking_hook])
def compare(profile: Profile, recipes: list[RecipeSpec], revision: str | int | float | None = None) -> dict[str, Any]:
    """Export, audit and evaluate every recipe of ``recipes`` on ``profile``'s base and data; returns the table.

    ``profile.recipe`` is not used. ``revision`` (optional) replaces ``profile.base.revision``.
    """
    recipes = check_recipes(recipes)
    profile, flow_run_id = with_revision(profile, revision), str(get_run_context().flow_run.id)
    logger, store = get_run_logger(), profile.artifact_store
    preflight_task(profile)
    cv = f"{code_version()}@{ArtifactStore(store).store_id()}"
    reap_stale_runs_task(profile.tracking_uri, flow_run_id)
    base = resolve_base_task(profile.base)
    lineage = ComparisonLineage(profile, recipes, base, flow_run_id, cv)
    scan = scan_base_task.submit(base, cv)
    shared: dict[str, Any] = {"fetch_text": fetch_text_task.submit(profile.text, store, cv)}
    if base.is_vlm and profile.image_text is not None:
        shared["fetch_image_text"] = fetch_image_text_task.submit(profile.image_text, store, cv)
    heldout = _heldout_image_text(profile, shared, cv)
    shared["bf16_reference"] = bf16_reference_task.submit(
        base, profile.eval, store, profile.device, cv, profile.placement, heldout, profile.image_text if heldout else None,
        wait_for=[scan])
    calibration = calibration_profile(profile, recipes)
    per_recipe: dict[str, dict[str, Any]] = {}
    try:
        scan.result()
        previous: list[Any] = []
        for recipe in recipes:  # each recipe calls the calibration; after the first, every call is a cache hit
            calls = _calibrations(base, shared, calibration, cv, scan)
            states = {label: ref for call, _ in calls for label, ref in call.result().items()}
            steps = {f"calibrate_{label}": _Output(call, label) for call, labels in calls for label in labels}
            steps["merge_amax"] = merge_amax_task.submit(states, store, cv, wait_for=[call for call, _ in calls])
            steps |= submit_recipe(recipe, profile, base, shared, steps["merge_amax"], calibration.recipe, cv, heldout,
                                   wait_for=previous)
            per_recipe[recipe.name] = steps
            previous = [steps["export"]]
        for future in [*shared.values(), *(f for steps in per_recipe.values() for f in steps.values())]:
            future.result()
    except BaseException:
        lineage.record(shared, per_recipe, ArtifactStore(store))
        lineage.finish([], None, failed=True)
        raise
    finally:
        release_kept_model()
    cached, rows = lineage.record(shared, per_recipe, ArtifactStore(store))
    bf16 = per_recipe[recipes[0].name]["evaluate"].result().meta.get("perplexity_bf16")
    table = lineage.finish(rows, bf16)
    create_markdown_artifact(key=f"compare-{profile.name}".replace(".", "-"), description=f"compare recipes on {profile.name}",
                             markdown=f"# compare {profile.name}\n\nMLflow parent run: "
                                      f"{lineage.tracker.run_url(lineage.parent_id)}\n\n{table}")
    logger.info("recipes compared:\n%s", table)
    return {"rows": rows, "table": table, "mlflow_run_id": lineage.parent_id, "cached": cached,
            "checkpoints": {name: steps["export"].result().model_dump() for name, steps in per_recipe.items()}}
