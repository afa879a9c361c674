"""The ``calibrate-shard`` flow: one calibration call of a quantize run, on whichever worker of a pool takes it.

The quantize flow (``calibration_pool`` in its profile) starts one flow run of this flow's
deployment per calibration call (``tasks/calibrate_remote.py``, :mod:`quantdag.runtime.fanout`),
with the idempotency key ``<quantize flow run>/<labels>/<attempt>``. A worker of the pool (a
process worker on a GPU host, or a Kubernetes Job with one GPU: ``infra/k8s``) runs it:

    heartbeat on (record/heartbeat.json, every lease/4)
      -> calibrate the call's units on one model load (``tasks.calibrate``, one GPU slot)
      -> publish the quantizer states (content-addressed, in the artifact store)
      -> publish record/done.json naming them (once)

Nothing travels back through Prefect's results: the quantize flow reads ``done.json`` from the
artifact store, merges and exports. A worker killed mid-shard stops beating; the quantize flow
marks the run Crashed and starts the next attempt, on another worker.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from conf.schema import ImageTextSource, PlacementSpec, RecipeSpec, TextSource
from quantdag.model.loading import BaseRef
from quantdag.runtime.shard_lease import ShardHeartbeat, ShardRecord
from quantdag.runtime.store import ArtifactRef
from quantdag.runtime.version import code_version as current_code_version
from tasks.calibrate import calibrate_task, call_labels
from tasks.calibration_split import Shards


@flow(name="calibrate-shard", log_prints=True, validate_parameters=True)
def calibrate_shard(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                    sources: dict[str, ImageTextSource | TextSource], artifact_store: str, record: str,
                    device: str = "auto", code_version: str = "", shards: dict[str, Shards] | None = None,
                    placement: PlacementSpec = PlacementSpec(), lease_seconds: float = 120.0,
                    attempt: int = 0) -> dict[str, ArtifactRef]:
    """Calibrate one call's units on this worker and publish their states through the artifact store.

    Args:
        base, rows, recipe, sources, artifact_store, device, code_version, shards, placement: the
            call, as ``tasks.calibrate.calibrate_task`` takes it.
        record: the :class:`~quantdag.runtime.shard_lease.ShardRecord` prefix of this attempt.
        lease_seconds: the heartbeat lease (seconds); beats every quarter of it.
        attempt: this attempt's number (0, 1, ...), recorded in ``done.json``.

    Returns:
        Label -> ``quantizer-state`` reference (also in ``done.json``).

    Raises:
        ValueError: a bad call (see ``tasks.calibrate.calibrate``).
        RuntimeError: this worker runs other code than the quantize flow (``code_version``: its
            states would be cached under the other code's key), the vision tower did not run, or
            this attempt's result was already published.
    """
    here = current_code_version()
    if code_version and code_version.split("@", 1)[0] != here:
        raise RuntimeError(f"this worker runs quantdag {here}, the quantize flow {code_version.split('@', 1)[0]}: "
                           "install the same commit on every worker of the pool (pip install .) and restart it")
    flow_run_id = str(get_run_context().flow_run.id)
    shard = ShardRecord(record)
    logger = get_run_logger()
    with ShardHeartbeat(shard, lease_seconds, flow_run_id):
        logger.info("calibrating %s (attempt %d); heartbeat and record under %s",
                    "+".join(call_labels(rows, shards)), attempt, record)
        # the step function with its model lock and GPU slot; no task run of its own: the quantize
        # flow's calibrate task is the cached step, this flow run is its execution
        refs = calibrate_task.fn(base, rows, recipe, sources, artifact_store, device, code_version, shards, placement)
        shard.finish(refs, flow_run_id, attempt)
    return refs
