"""Run one calibration shard as flow runs of a deployment on a work pool until one of them delivers.

:func:`run_shard` submits the shard with ``run_deployment`` (no waiting inside Prefect) under the
idempotency key ``<parent flow run>/<label>/<attempt>``, then watches two things each poll:

- the shard's record in the artifact store (:mod:`quantdag.runtime.shard_lease`): a published
  ``done.json`` of any attempt is the result; its heartbeat tells whether the process still lives;
- the flow run's Prefect state: Failed ends the flow (the shard's own error: a bad row, an amax
  check; retrying would fail again), Crashed or Cancelled is retried.

A worker killed with ``kill -9`` leaves its flow run Running forever. Once that run's heartbeat
is ``lease`` seconds old (or, before its first beat, once it has been Pending or Running for
``start_timeout`` seconds) the run is set to Crashed, naming why, and the shard is submitted again
with the next attempt's key, for any worker of the pool to take. The idempotency key makes a
retried parent (a UI Retry keeps the flow-run id) find its earlier shard runs instead of starting
duplicates: a finished one is reused, an ended one moves on to the next attempt.

Merging stays exact whatever ran where: each shard's amax are a max over its rows, and every label
is merged from exactly one published result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from quantdag.runtime.shard_lease import ShardRecord
from quantdag.runtime.store import ArtifactRef

log = logging.getLogger(__name__)

RETRIED = {"CRASHED", "CANCELLED"}
"""Terminal state types after which a shard runs again (the infrastructure failed, not the shard)."""
STARTING = {"PENDING", "RUNNING", "CANCELLING"}
"""States of a run that a worker has taken: from here on it must beat."""


@dataclass(frozen=True)
class ShardPolicy:
    """How a shard is watched.

    Attributes:
        lease_seconds: a heartbeat older than this means the shard's process is gone.
        start_timeout_seconds: seconds a taken run may spend before its first heartbeat.
        max_attempts: flow runs tried before giving up.
        poll_seconds: pause between looks at the store and the API.
    """

    lease_seconds: float
    start_timeout_seconds: float
    max_attempts: int
    poll_seconds: float = 2.0


@dataclass
class ShardOutcome:
    """What :func:`run_shard` did for one shard.

    Attributes:
        refs: label -> quantizer-state reference, from the one published result merged.
        flow_run_ids: every flow run submitted for the shard, in attempt order.
        crashed: flow run id -> why it was declared dead and retried.
        attempt: the attempt whose result was taken.
    """

    refs: dict[str, ArtifactRef]
    flow_run_ids: list[str] = field(default_factory=list)
    crashed: dict[str, str] = field(default_factory=dict)
    attempt: int = 0


def idempotency_key(parent: str, label: str, attempt: int) -> str:
    """``<parent flow run>/<label>/<attempt>``: one flow run per shard attempt, however often it is asked for."""
    return f"{parent}/{label}/{attempt}"


def _read_run(flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _crash(flow_run_id: str, reason: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)


def _submit(deployment: str, parameters: dict[str, Any], key: str, name: str) -> Any:
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        return run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=key, flow_run_name=name,
                              tags=["quantdag", "calibrate-shard"])
    except ObjectNotFound as err:
        raise ValueError(f"calibration_pool.deployment {deployment!r} does not exist on the Prefect server: deploy it "
                         "(prefect deploy --all from the repository, entry calibrate-shard) or name an existing "
                         "'<flow>/<deployment>'") from err


def dead_reason(record: ShardRecord, run: Any, policy: ShardPolicy, now: float | None = None) -> str | None:
    """Why a taken, unfinished shard run counts as dead, or None while it lives (or has not been taken).

    Args:
        record: the attempt's record (its heartbeat).
        run: the Prefect flow run (its state type and the time it entered that state).
        policy: lease and start timeout.
        now: unix seconds (default: the current time).
    """
    now = time.time() if now is None else now
    state = run.state.type.value if run.state else "SCHEDULED"
    if state not in STARTING:
        return None
    expired = record.expired_for(now)
    if expired is not None:
        if expired <= 0:
            return None
        return (f"no shard heartbeat for {expired + policy.lease_seconds:.0f} s (lease {policy.lease_seconds:g} s) "
                f"while Prefect showed it {run.state.name}: its worker or process is gone")
    since = run.state.timestamp.timestamp() if run.state and run.state.timestamp else now
    if now - since > policy.start_timeout_seconds:
        return (f"taken by a worker {now - since:.0f} s ago ({run.state.name}) and never started its heartbeat "
                f"(start timeout {policy.start_timeout_seconds:g} s)")
    return None


def run_shard(deployment: str, parameters: dict[str, Any], artifact_store: str, parent: str, label: str,
              policy: ShardPolicy, submit: Callable[[str, dict[str, Any], str, str], Any] = _submit,
              sleep: Callable[[float], None] = time.sleep) -> ShardOutcome:
    """Run one shard as flow runs of ``deployment`` until one publishes its result.

    Each attempt gets the parameters plus ``record`` (its :class:`ShardRecord` prefix),
    ``lease_seconds`` and ``attempt``; the flow on the worker must beat and publish there.

    Args:
        deployment: ``<flow name>/<deployment name>``.
        parameters: the shard flow's parameters (JSON-compatible or pydantic values).
        artifact_store: the profile's artifact store (the records live under it).
        parent: the parent flow run's id.
        label: the call's state labels joined by ``+`` (``text[1]``, ``image_text+text``): unique in
            the parent run.
        policy: lease, start timeout, attempts, poll interval.
        submit: ``(deployment, parameters, idempotency key, flow run name) -> FlowRun`` (tests
            replace the Prefect call).
        sleep: the pause between polls.

    Returns:
        The :class:`ShardOutcome` (the references of the one result merged).

    Raises:
        RuntimeError: a shard run Failed (its error message is quoted; no retry), or all
            ``policy.max_attempts`` runs died, or a run Completed without publishing a result.
    """
    outcome = ShardOutcome(refs={})
    records: list[ShardRecord] = []
    for attempt in range(policy.max_attempts):
        record = ShardRecord.of(artifact_store, parent, label, attempt)
        records.append(record)
        run = submit(deployment, {**parameters, "record": record.prefix, "lease_seconds": policy.lease_seconds,
                                  "attempt": attempt},
                     idempotency_key(parent, label, attempt), f"calibrate-shard-{label}-{attempt}")
        flow_run_id = str(run.id)
        outcome.flow_run_ids.append(flow_run_id)
        seen_alive, said_late = False, False
        while True:
            for index, earlier in enumerate(records):  # a slow attempt declared dead may still deliver
                refs = earlier.result()
                if refs is not None:
                    outcome.refs, outcome.attempt = refs, index
                    return outcome
            run = _read_run(flow_run_id)
            state = run.state.type.value if run.state else "SCHEDULED"
            if state == "COMPLETED":
                if records[-1].result() is None:
                    raise RuntimeError(f"shard {label}: flow run {flow_run_id} completed without publishing "
                                       f"{record.prefix}/done.json; is the deployment {deployment} a calibrate-shard flow?")
                continue  # published between the two reads: taken on the next pass
            if state == "FAILED":
                if seen_alive:  # it failed while this parent watched it: the shard's own error
                    raise RuntimeError(f"shard {label}: flow run {flow_run_id} failed: {run.state.message}")
                reason = "had failed before this parent attempt (a retried parent run) submitted it again"
                break
            if state in RETRIED:
                reason = f"ended {run.state.name}: {run.state.message or 'no message'}"
                break
            seen_alive = True  # not terminal: created by this call, or an earlier parent attempt's still running
            if run.state.name == "Late" and not said_late:
                log.warning("shard %s: flow run %s is Late: no worker of %s's work pool has taken it; start one "
                            "(prefect worker start --pool <pool>)", label, flow_run_id, deployment)
                said_late = True
            reason = dead_reason(record, run, policy)
            if reason is not None:
                then = (f"resubmitted as attempt {attempt + 1}" if attempt + 1 < policy.max_attempts
                        else f"no attempt left of {policy.max_attempts}")
                _crash(flow_run_id, f"quantdag: {reason}; shard {label} {then}")
                break
            sleep(policy.poll_seconds)
        outcome.crashed[flow_run_id] = reason
        log.warning("shard %s: flow run %s (attempt %d) %s; submitting attempt %d", label, flow_run_id, attempt,
                    reason, attempt + 1)
    raise RuntimeError(f"shard {label}: {policy.max_attempts} flow runs of {deployment} died without a result "
                       f"({'; '.join(f'{run}: {why}' for run, why in outcome.crashed.items())}); check the pool's "
                       f"workers, or raise calibration_pool.max_attempts")
