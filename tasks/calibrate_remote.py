"""Calibration on a work pool: one ``calibrate`` call as flow runs of the ``calibrate-shard`` deployment.

With ``calibration_pool`` set, each calibration call of the quantize flow (a branch or one shard
of it, ``tasks.calibration_split``) is this step instead of ``tasks.calibrate``: it runs in a
thread of the flow's process, starts the call as a flow run of the pool's deployment (any worker,
any host, one GPU each: ``flows/calibrate_shard.py``) and waits for the quantizer states it
publishes in the artifact store, resubmitting the call when its worker dies
(:mod:`quantdag.runtime.fanout`). It is cached like ``calibrate``: same inputs, same states.
"""

from __future__ import annotations

import logging

from conf.schema import CalibrationPoolSpec, ImageTextSource, PlacementSpec, RecipeSpec, TextSource
from quantdag.model.loading import BaseRef
from quantdag.runtime.fanout import ShardPolicy, run_shard
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.store import ArtifactRef
from tasks.calibrate import run_name
from tasks.calibration_split import Shards, call_labels

log = logging.getLogger(__name__)


def shard_policy(pool: CalibrationPoolSpec) -> ShardPolicy:
    """The watch policy of a profile's pool: its lease, start timeout and attempts; polls every quarter lease (<= 2 s)."""
    return ShardPolicy(lease_seconds=pool.lease_seconds, start_timeout_seconds=pool.start_timeout_seconds,
                       max_attempts=pool.max_attempts, poll_seconds=min(2.0, pool.lease_seconds / 4))


def calibrate_on_pool(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                      sources: dict[str, ImageTextSource | TextSource], artifact_store: str, device: str,
                      code_version: str, shards: dict[str, Shards] | None, placement: PlacementSpec,
                      pool: CalibrationPoolSpec, parent: str) -> dict[str, ArtifactRef]:
    """Run one calibration call on the pool and return its states (as ``tasks.calibrate.calibrate`` would).

    Args:
        base, rows, recipe, sources, artifact_store, device, code_version, shards, placement: the
            call, as for ``tasks.calibrate.calibrate_task``; sent to the shard flow as parameters.
        pool: the profile's ``calibration_pool``.
        parent: the quantize flow run's id (it names the shard's idempotency keys and records).

    Returns:
        Label -> ``quantizer-state`` reference, exactly the labels of the call.

    Raises:
        RuntimeError: the shard failed, died ``pool.max_attempts`` times, or published other
            labels than the call's.
    """
    labels = call_labels(rows, shards)
    parameters = {"base": base, "rows": rows, "recipe": recipe, "sources": sources, "artifact_store": artifact_store,
                  "device": device, "code_version": code_version, "shards": shards, "placement": placement}
    outcome = run_shard(pool.deployment, parameters, artifact_store, parent, "+".join(labels), shard_policy(pool))
    if sorted(outcome.refs) != sorted(labels):
        raise RuntimeError(f"shard {'+'.join(labels)} published states for {sorted(outcome.refs)}, not {sorted(labels)}")
    if outcome.crashed:
        log.warning("shard %s: %d flow run(s) died and were replaced (%s); attempt %d delivered", "+".join(labels),
                    len(outcome.crashed), "; ".join(f"{run}: {why}" for run, why in outcome.crashed.items()),
                    outcome.attempt)
    return outcome.refs


@quantdag_task("calibrate", task_run_name=run_name)
def calibrate_remote_task(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                          sources: dict[str, ImageTextSource | TextSource], artifact_store: str, device: str,
                          code_version: str, shards: dict[str, Shards] | None = None,
                          placement: PlacementSpec = PlacementSpec(),
                          pool: CalibrationPoolSpec = CalibrationPoolSpec()) -> dict[str, ArtifactRef]:
    """Prefect wrapper of :func:`calibrate_on_pool` (``placement`` is not part of the cache key)."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        raise RuntimeError("calibrate_remote_task runs as a Prefect task of a flow run (it names the shard runs after it)")
    return calibrate_on_pool(base, rows, recipe, sources, artifact_store, device, code_version, shards, placement, pool,
                             str(context.task_run.flow_run_id))
