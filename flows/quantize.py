"""The quantize flow: BF16 base -> calibrated, merged, exported, evaluated NVFP4 checkpoint.

    fetch_image_text(_heldout), fetch_text -> bf16_reference -> calibrate (1..N calls) -> merge_amax
        -> [hessian] -> [weight_scales] -> export -> audit, evaluate (against the stored reference) -> register

A recipe other than NVFP4 W4A4 with max weight scales gets its quantizer state from
``weight_scales`` (after ``hessian`` for local_hessian) over a max calibration of
``calibration_recipe`` (``flows/steps.py``); the reference recipe exports the merged calibration.

Every step is a cached Prefect task keyed on its inputs + source + code version. Tasks run in
threads of the flow's process (``ThreadPoolTaskRunner``), so a rerun whose steps are all cached
starts no worker process and loads no model. Steps that load a model take a process-wide lock
and one GPU slot (``quantdag/runtime/prefect_task.py``): ModelOpt's KV-cache quantization swaps
transformers' module-global attention function during each quantized forward, so two model steps
never overlap in one process. Calibration is one task, ``calibrate`` (``tasks/calibrate.py``),
called as ``tasks.calibrate.calibration_calls`` splits it: with ``calibration_gpus: 1`` and no
sharded branch, ONE call calibrates both branches on one model load; with shards every branch shard
is a call of its own, one after another (``calibration_gpus: 1``); with ``calibration_gpus: N``
there is one call per GPU, the first in this process, the others in worker processes bound to
one GPU each that preload the base while the reference runs and end before export loads the
model; with ``calibration_pool`` every shard is a flow run of the ``calibrate-shard`` deployment
on a work pool (``flows/calibration_layout.py``).
Each call returns a state per branch label (``text``, ``text[1]``...); merge takes their union.
A text-only base skips the image-text branch. The BF16 reference (``tasks/reference.py``) runs
before calibration and leaves its loaded model to it, calibration leaves the calibrated model to
export (``quantdag.model.warm``): one load of the base for the three when none is cached, plus one
read of the export by evaluate; each model step places the model within ``placement``'s memory
budget (``quantdag.model.placement``). Before any model loads, ``preflight`` probes S3 and
MLflow and counts the inputs, ``reap_stale_runs`` ends the MLflow runs of killed flow runs and
``scan_base`` names any NaN/inf weight of the base; the hooks end this run's
MLflow runs when it fails, crashes or is cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from conf.schema import Profile
from flows import calibration_layout as layout
from flows.steps import calibration_profile, submit_recipe
from quantdag.model.warm import release as release_kept_model
from quantdag.runtime.deploy import apply_run_parameters
from quantdag.runtime.graph import detached
from quantdag.runtime.lineage import Lineage
from quantdag.runtime.naming import flow_run_name, settle_flow_run_name, tag_attempts
from quantdag.runtime.reaper import end_tracking_hook
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.version import code_version
from tasks.calibrate import call_labels, calibration_calls
from tasks.fetch import fetch_image_text_heldout_task, fetch_image_text_task, fetch_text_task
from tasks.merge import merge_amax_task
from tasks.preflight import preflight_task
from tasks.reference import bf16_reference_task
from tasks.reap import reap_stale_runs_task
from tasks.resolve import resolve_base_task
from tasks.scan import scan_base_task


@flow(name="quantize", flow_run_name=flow_run_name, log_prints=True, task_runner=ThreadPoolTaskRunner(),
      on_failure=[end_tracking_hook], on_crashed=[end_tracking_hook], on_cancellation=[end_tracking_hook])
@tag_attempts  # a UI Retry's task runs carry the tag attempt-<n>
def quantize(profile: Profile, revision: str | int | float | None = None,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize ``profile.base`` with ``profile.recipe``; returns the checkpoint URI, MLflow ids, metrics.

    ``revision`` (optional) replaces ``profile.base.revision``: ``prefect deployment run
    --param revision=12345`` reaches the flow as the string ``"12345"``. ``overrides`` (optional)
    changes settings by dotted key: ``--param overrides='{"eval.max_windows": 2}'``. The run is
    named ``<profile>-<base>@<sha7>-<recipe>`` unless it was given a name (``quantdag.runtime.naming``).
    """
    profile, flow_run_id = apply_run_parameters(profile, revision, overrides), str(get_run_context().flow_run.id)
    logger, store = get_run_logger(), profile.artifact_store
    preflight_task(profile)
    # the store's id joins the cache key: a deleted or new store never serves cached references
    cv = f"{code_version()}@{ArtifactStore(store).store_id()}"
    reap_stale_runs_task(profile.tracking_uri, flow_run_id)
    resolved = resolve_base_task.submit(profile.base)
    base = detached(resolved.result())  # the graph's edge from resolve_base goes to scan_base alone
    lineage = Lineage(profile, base, flow_run_id, cv, settle_flow_run_name(flow_run_id, profile, base))
    scan = scan_base_task.submit(base, cv, wait_for=[resolved])  # names NaN/inf weights before any model loads
    futures: dict[str, Any] = {"fetch_text": fetch_text_task.submit(profile.text, store, cv)}
    if base.is_vlm and profile.image_text is not None:
        futures["fetch_image_text"] = fetch_image_text_task.submit(profile.image_text, store, cv)
    else:
        logger.info("base %s is text-only (or image_text is null): skipping the image-text branch", base.model_type)
    heldout = _heldout_image_text(profile, futures, cv)
    # the BF16 reference runs first: calibration then takes its loaded model (one load for both)
    futures["bf16_reference"] = bf16_reference_task.submit(
        base, profile.eval, store, profile.device, cv, profile.placement, heldout, profile.image_text if heldout else None,
        wait_for=[scan])
    calibration = calibration_profile(profile)  # the recipe's own, or the shared one its weight_scales step reads
    calls = _calibrations(base, futures, calibration, cv, scan)
    futures |= {f"calibrate_{label}": _Output(call, label) for call, labels in calls for label in labels}
    try:
        scan.result()  # a damaged base fails with its tensor names, not as the reference's upstream
        for future in futures.values():  # in DAG order: the first failure raises its own error
            future.result()
        states = {label: ref for call, _ in calls for label, ref in call.result().items()}  # every call's, unioned
        futures["merge_amax"] = merge_amax_task.submit(states, store, cv, wait_for=[call for call, _ in calls])
        futures |= submit_recipe(profile.recipe, profile, base, futures, futures["merge_amax"], calibration.recipe, cv,
                                 heldout)
        for future in futures.values():
            future.result()  # a failed audit keeps the checkpoint out of the registry
        checkpoint, report = futures["export"].result(), futures["evaluate"].result()
        if not ArtifactStore(store).exists(checkpoint):
            raise RuntimeError(f"checkpoint {checkpoint.uri} is missing from the store; not registering it")
        version = lineage.register(checkpoint, futures["audit"].result())  # only the audited bytes
    except BaseException:
        lineage.record_steps(futures, ArtifactStore(store))
        lineage.finish({}, failed=True)
        raise
    finally:
        release_kept_model()  # a model no later step of this run takes (e.g. export was a cache hit)
    cached = lineage.record_steps(futures, ArtifactStore(store))
    lineage.finish(report.meta)
    create_markdown_artifact(key=f"quantize-{profile.name}".replace(".", "-"),
                             markdown=lineage.summary_markdown(checkpoint, report.meta, version, cached),
                             description=lineage.name)
    logger.info("checkpoint: %s\nMLflow: %s", checkpoint.uri, lineage.tracker.run_url(lineage.parent_id))
    return {"checkpoint": checkpoint.model_dump(), "mlflow_run_id": lineage.parent_id, "model_version": version,
            "metrics": {**report.meta, "model_loads": float(lineage.model_loads)}, "cached": cached}


@dataclass(frozen=True)
class _Output:
    """One branch state of a calibration call (whose future returns ``{label: state}``), read as a step."""

    call: PrefectFuture
    label: str

    @property
    def state(self) -> Any:
        return self.call.state

    def result(self) -> ArtifactRef:
        return self.call.result()[self.label]


def _calibrations(base: Any, futures: dict[str, Any], profile: Profile, cv: str,
                  scan: PrefectFuture) -> list[tuple[PrefectFuture, list[str]]]:
    """Submit one ``calibrate`` task per call of :func:`tasks.calibrate.calibration_calls` over the
    fetched branches, where :mod:`flows.calibration_layout` says (this process; one worker per GPU
    when ``calibration_gpus > 1``, waited for here; a work pool with ``calibration_pool``), each
    after the base's NaN/inf scan (``scan``); returns each call's future and the labels of the states it returns."""
    sources = {kind: source for kind, source in (("image_text", profile.image_text), ("text", profile.text))
               if f"fetch_{kind}" in futures}
    calls = [{"base": base, "rows": {kind: futures[f"fetch_{kind}"] for kind in shards}, "recipe": profile.recipe,
              "sources": {kind: sources[kind] for kind in shards}, "artifact_store": profile.artifact_store,
              "device": profile.device, "code_version": cv, "shards": shards, "placement": profile.placement}
             for shards in calibration_calls({kind: source.shards for kind, source in sources.items()},
                                             profile.calibration_gpus, per_shard=profile.calibration_pool is not None)]
    if profile.calibration_pool is not None:  # each call a flow run of the calibrate-shard deployment
        submitted = layout.on_work_pool(calls, profile, scan)
    elif profile.calibration_gpus == 1:  # after the reference, whose loaded model the first call takes
        submitted = layout.in_this_process(calls, futures["bf16_reference"])
    else:  # one call per GPU; the workers end (and free their GPUs) before export loads the model
        submitted = layout.on_gpu_workers(calls, profile, base, futures["bf16_reference"], scan)
    return [(future, call_labels(parameters["rows"], parameters["shards"])) for future, parameters in zip(submitted, calls)]


def _heldout_image_text(profile: Profile, futures: dict[str, Any], cv: str) -> Any:
    """Submit the held-out image-text fetch (never a calibration row) when the eval asks for one."""
    if "fetch_image_text" not in futures or not profile.eval.image_text_samples:
        return None
    source = profile.image_text.model_copy(
        update={"num_samples": profile.eval.image_text_samples, "seed": profile.image_text.seed + 1, "shards": 1})
    futures["fetch_image_text_heldout"] = fetch_image_text_heldout_task.submit(
        source, profile.artifact_store, cv, exclude=futures["fetch_image_text"])
    return futures["fetch_image_text_heldout"]
