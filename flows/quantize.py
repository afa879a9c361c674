"""The quantize flow: BF16 base -> calibrated, merged, exported, evaluated NVFP4 checkpoint.

    fetch_image_text -> calibrate_image_text --+
                                               +-> merge_amax -> export -> audit, evaluate -> register
    fetch_text -------> calibrate_text --------+

Every step is a cached Prefect task keyed on its inputs + source + code version. Tasks run in
threads of the flow's process (``ThreadPoolTaskRunner``), so a rerun whose steps are all cached
starts no worker process and loads no model. Steps that load a model take a process-wide lock
and one GPU slot (``quantdag/runtime/prefect_task.py``): ModelOpt's KV-cache quantization swaps
transformers' module-global attention function during each quantized forward, so two model steps
never overlap in one process. With ``calibration_gpus: 1`` and no sharded branch both branches
calibrate as one ``calibrate_branches`` task on one model load (``tasks/calibrate_shared.py``),
one state per branch. With ``calibration_gpus: N > 1`` every branch (or shard) is a task of its
own in a pool of N worker processes (``ProcessPoolTaskRunner``), one GPU each, that ends before
export loads the model. A text-only base skips the image-text branch. Before any model loads,
``preflight`` probes S3 and MLflow and ``reap_stale_runs`` ends the MLflow runs of killed flow
runs; the hooks end this run's MLflow runs when it fails, crashes or is cancelled.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from conf.schema import Profile
from quantdag.runtime.lineage import Lineage
from quantdag.runtime.deploy import with_revision
from quantdag.runtime.preflight import preflight_task
from quantdag.runtime.reaper import end_tracking_hook, reap_stale_runs_task
from quantdag.runtime.store import ArtifactStore
from quantdag.runtime.version import code_version
from tasks.audit import audit_task
from tasks.calibrate import calibrate_image_text_task, calibrate_text_task
from tasks.calibrate_shared import calibrate_branches_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.fetch import fetch_image_text_task, fetch_text_task
from tasks.merge import merge_amax_task
from tasks.resolve import resolve_base_task


@flow(name="quantize", flow_run_name="quantize-{profile.name}", log_prints=True, task_runner=ThreadPoolTaskRunner(),
      on_failure=[end_tracking_hook], on_crashed=[end_tracking_hook], on_cancellation=[end_tracking_hook])
def quantize(profile: Profile, revision: str | int | float | None = None) -> dict[str, Any]:
    """Quantize ``profile.base`` with ``profile.recipe``; returns the checkpoint URI, MLflow ids, metrics.

    ``revision`` (optional) replaces ``profile.base.revision``: ``prefect deployment run
    --param revision=12345`` reaches the flow as the string ``"12345"``.
    """
    profile, flow_run_id = with_revision(profile, revision), str(get_run_context().flow_run.id)
    logger, store = get_run_logger(), profile.artifact_store
    preflight_task(profile)
    # the store's id joins the cache key: a deleted or new store never serves cached references
    cv = f"{code_version()}@{ArtifactStore(store).store_id()}"
    reap_stale_runs_task(profile.tracking_uri, flow_run_id)
    base = resolve_base_task(profile.base)
    lineage = Lineage(profile, base, flow_run_id, cv)
    futures: dict[str, Any] = {"fetch_text": fetch_text_task.submit(profile.text, store, cv)}
    if base.is_vlm and profile.image_text is not None:
        futures["fetch_image_text"] = fetch_image_text_task.submit(profile.image_text, store, cv)
    else:
        logger.info("base %s is text-only (or image_text is null): skipping the image-text branch", base.model_type)
    futures |= _calibrations(base, futures, profile, cv)
    try:
        states = futures.get("calibrate_branches") or {
            k.removeprefix("calibrate_"): f for k, f in futures.items() if k.startswith("calibrate_")}
        futures["merge_amax"] = merge_amax_task.submit(states, store, cv)
        futures["export"] = export_task.submit(base, futures["merge_amax"], profile.recipe, store, profile.device, cv)
        futures["audit"] = audit_task.submit(base, futures["export"], store, cv)
        heldout = _heldout_image_text(profile, futures, cv)
        futures["evaluate"] = evaluate_task.submit(base, futures["export"], profile.eval, store, profile.device, cv,
                                                   heldout, profile.image_text if heldout else None)
        for future in futures.values():  # in DAG order: the first failure raises its own error
            future.result()  # a failed audit keeps the checkpoint out of the registry
        checkpoint, report = futures["export"].result(), futures["evaluate"].result()
        if not ArtifactStore(store).exists(checkpoint):
            raise RuntimeError(f"checkpoint {checkpoint.uri} is missing from the store; not registering it")
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


def _calibrations(base: Any, futures: dict[str, Any], profile: Profile, cv: str) -> dict[str, Any]:
    """Submit the fetched branches' calibration; see the module docstring for where each runs."""
    branches = {kind: source for kind, source in (("image_text", profile.image_text), ("text", profile.text))
                if f"fetch_{kind}" in futures}
    if profile.calibration_gpus == 1 and all(source.shards == 1 for source in branches.values()):
        rows = {kind: futures[f"fetch_{kind}"] for kind in branches}
        return {"calibrate_branches": calibrate_branches_task.submit(
            base, rows, profile.recipe, branches, profile.artifact_store, profile.device, cv)}
    tasks = {"image_text": calibrate_image_text_task, "text": calibrate_text_task}
    calls = {}
    for kind, source in branches.items():
        for shard in range(source.shards):
            name = f"calibrate_{kind}" if source.shards == 1 else f"calibrate_{kind}[{shard}]"
            calls[name] = (tasks[kind], {
                "base": base, "rows": futures[f"fetch_{kind}"], "recipe": profile.recipe, "source": source,
                "artifact_store": profile.artifact_store, "device": profile.device, "code_version": cv,
                "shard": shard, "num_shards": source.shards})
    if profile.calibration_gpus == 1:
        return {name: task.submit(**parameters) for name, (task, parameters) in calls.items()}
    # one worker process per GPU; the pool ends (and frees its GPUs) before export loads the model
    with ProcessPoolTaskRunner(max_workers=min(profile.calibration_gpus, len(calls))) as pool:
        submitted = {name: pool.submit(task, parameters) for name, (task, parameters) in calls.items()}
        for future in submitted.values():
            future.wait()
    return submitted


def _heldout_image_text(profile: Profile, futures: dict[str, Any], cv: str) -> Any:
    """Submit the held-out image-text fetch (never a calibration row) when the eval asks for one."""
    if "fetch_image_text" not in futures or not profile.eval.image_text_samples:
        return None
    source = profile.image_text.model_copy(
        update={"num_samples": profile.eval.image_text_samples, "seed": profile.image_text.seed + 1, "shards": 1})
    futures["fetch_image_text_heldout"] = fetch_image_text_task.submit(
        source, profile.artifact_store, cv, exclude=futures["fetch_image_text"])
    return futures["fetch_image_text_heldout"]


_DATASET_CONTEXT = {"fetch_image_text_heldout": "evaluation-image-text", "fetch_text": "calibration-text", "fetch_image_text": "calibration-image-text"}


def _record_steps(lineage: Lineage, futures: dict[str, Any], store: ArtifactStore) -> dict[str, bool]:
    """Log a child run for every finished step; returns step -> whether it was a cache hit."""
    cached = {}
    for step, future in futures.items():
        state = future.state
        if state.is_completed():
            result = future.result()  # calibrate_branches: {kind: state}, logged as calibrate_<kind>
            for name, ref in ({f"calibrate_{k}": r for k, r in result.items()} if isinstance(result, dict)
                              else {step: result}).items():
                cached[name] = state.name == "Cached"
                lineage.step(name, ref, cached=cached[name], store=store, dataset_context=_DATASET_CONTEXT.get(name))
    return cached
