"""The quantize flow: BF16 base -> calibrated, merged, exported, evaluated NVFP4 checkpoint.

    fetch_image_text -> calibrate_image_text --+
                                               +-> merge_amax -> export -> evaluate -> register
    fetch_text -------> calibrate_text --------+

Every step is a cached Prefect task keyed on its inputs + source + code version; the two
calibration branches run concurrently. A text-only base skips the image-text branch.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from conf.schema import Profile
from flows.lineage import Lineage
from quantdag.store import ArtifactStore
from quantdag.version import code_version
from tasks.calibrate import calibrate_image_text_task, calibrate_text_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.fetch import fetch_image_text_task, fetch_text_task
from tasks.merge import merge_amax_task
from tasks.resolve import resolve_base_task


@flow(name="quantize", flow_run_name="quantize-{profile.name}", log_prints=True)
def quantize(profile: Profile) -> dict[str, Any]:
    """Quantize ``profile.base`` with ``profile.recipe``; returns the checkpoint URI, MLflow ids, metrics."""
    logger, cv, store = get_run_logger(), code_version(), profile.artifact_store
    base = resolve_base_task(profile.base)
    lineage = Lineage(profile, base, str(get_run_context().flow_run.id), cv)
    futures: dict[str, Any] = {"fetch_text": fetch_text_task.submit(profile.text, store, cv)}
    if base.is_vlm and profile.image_text is not None:
        futures["fetch_image_text"] = fetch_image_text_task.submit(profile.image_text, store, cv)
        futures["calibrate_image_text"] = calibrate_image_text_task.submit(
            base, futures["fetch_image_text"], profile.recipe, profile.image_text, store, profile.device, cv)
    else:
        logger.info("base %s is text-only (or image_text is null): skipping the image-text branch", base.model_type)
    futures["calibrate_text"] = calibrate_text_task.submit(
        base, futures["fetch_text"], profile.recipe, profile.text, store, profile.device, cv)
    try:
        states = {k.removeprefix("calibrate_"): f for k, f in futures.items() if k.startswith("calibrate_")}
        futures["merge_amax"] = merge_amax_task.submit(states, store, cv)
        futures["export"] = export_task.submit(base, futures["merge_amax"], profile.recipe, store, profile.device, cv)
        futures["evaluate"] = evaluate_task.submit(base, futures["export"], profile.eval, store, profile.device, cv)
        checkpoint, report = futures["export"].result(), futures["evaluate"].result()
        version = lineage.register(checkpoint)
    except BaseException:
        _record_steps(lineage, futures, ArtifactStore(store))
        lineage.finish({}, failed=True)
        raise
    cached = _record_steps(lineage, futures, ArtifactStore(store))
    lineage.finish(report.meta)
    create_markdown_artifact(key=f"quantize-{profile.name}".replace(".", "-"),
                             markdown=lineage.summary_markdown(checkpoint, report.meta, version, cached),
                             description=f"quantize {profile.name}")
    logger.info("checkpoint: %s\nMLflow: %s", checkpoint.uri, lineage.tracker.run_url(lineage.parent_id))
    return {"checkpoint": checkpoint.model_dump(), "mlflow_run_id": lineage.parent_id, "model_version": version,
            "metrics": report.meta, "cached": cached}


_DATASET_CONTEXT = {"fetch_text": "calibration-text", "fetch_image_text": "calibration-image-text"}


def _record_steps(lineage: Lineage, futures: dict[str, Any], store: ArtifactStore) -> dict[str, bool]:
    """Log a child run for every finished step; returns step -> whether it was a cache hit."""
    cached = {}
    for step, future in futures.items():
        state = future.state
        if state.is_completed():
            cached[step] = state.name == "Cached"
            lineage.step(step, future.result(), cached=cached[step], store=store,
                         dataset_context=_DATASET_CONTEXT.get(step))
    return cached
