"""End MLflow runs that a killed flow run left RUNNING, and tell Prefect the run is gone.

A process killed with ``kill -9`` (OOM killer, node loss, a killed worker container) runs no
exception handler and no Prefect hook: its MLflow parent run stays RUNNING forever and Prefect
keeps showing the flow run as Running, so the UI offers no Retry. Two mechanisms close this:

- :func:`end_tracking_hook`, the flow's ``on_failure``/``on_crashed``/``on_cancellation`` hook,
  ends the run's MLflow records as FAILED or KILLED whenever Prefect gets to run a hook;
- :func:`reap_stale_runs`, the first step of every quantize run, looks for RUNNING parent runs of
  OTHER flow runs and ends each whose Prefect flow run is over (COMPLETED -> FINISHED, FAILED ->
  FAILED, CRASHED/CANCELLED -> KILLED), whose process is known to be gone (it ran on this machine
  and its pid no longer exists: :mod:`quantdag.runtime.liveness`; no waiting for the heartbeat) or
  whose heartbeat (``quantdag.runtime.tracking.Heartbeat``) is older than :func:`stale_after`; a
  flow run still marked Running whose process is gone or silent is set to Crashed in Prefect so
  it can be retried.

Every reason it records or logs passes through :func:`quantdag.runtime.secrets.redact`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from conf.settings import settings
from quantdag.runtime.liveness import PROCESS_TAG, describe, process_gone
from quantdag.runtime.secrets import redact
from quantdag.runtime.tracking import HEARTBEAT_TAG, Tracker

log = logging.getLogger(__name__)

FINAL_STATUS = {"COMPLETED": "FINISHED", "FAILED": "FAILED", "CRASHED": "KILLED", "CANCELLED": "KILLED"}
"""MLflow status for a parent run whose Prefect flow run ended in each terminal state type."""


def stale_after() -> float:
    """Seconds without a heartbeat after which a run counts as dead.

    ``QUANTDAG_STALE_AFTER_SECONDS``, default five heartbeat intervals (:mod:`conf.settings`).
    """
    return settings().stale_after


@dataclass(frozen=True)
class Reaped:
    """One MLflow parent run that was ended, and why."""

    run_id: str
    flow_run_id: str | None
    status: str
    reason: str


def _prefect_state(flow_run_id: str | None) -> str | None:
    """Type of the flow run's Prefect state (``RUNNING``, ``CRASHED``...), or None if unknown."""
    if not flow_run_id:
        return None
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception as err:  # noqa: BLE001 - another Prefect server's run, or the API is down
        log.info("cannot read Prefect flow run %s: %s", flow_run_id, err)
        return None
    return state.type.value if state else None


def _crash_in_prefect(flow_run_id: str, reason: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Crashed(message=f"quantdag reaper: {reason}"), force=True)


def end_runs(tracker: Tracker, parent_id: str, status: str, reason: str, end_ms: int | None = None) -> None:
    """End ``parent_id`` and its RUNNING child runs with ``status``; tag them with ``reason``."""
    children = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    for run_id in [child.info.run_id for child in children] + [parent_id]:
        tracker.set_tag(run_id, "quantdag.end_reason", reason)
        tracker.client.set_terminated(run_id, status, end_time=end_ms)


def reap_stale_runs(tracking_uri: str, current_flow_run_id: str | None = None) -> list[Reaped]:
    """End the RUNNING parent runs of other flow runs that are over or have stopped beating.

    Args:
        tracking_uri: the MLflow tracking URI of the profile.
        current_flow_run_id: this flow run's id; its own parent run is never touched.

    Returns:
        The runs that were ended.
    """
    tracker = Tracker(tracking_uri)
    running = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string="attributes.status = 'RUNNING' and tags.`quantdag.role` = 'parent'",
        max_results=500,
    )
    now, reaped = time.time(), []
    for run in running:
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        if flow_run_id == current_flow_run_id:
            continue
        last_beat = float(run.data.tags.get(HEARTBEAT_TAG, run.info.start_time / 1000))
        state = _prefect_state(flow_run_id)
        process = run.data.tags.get(PROCESS_TAG)
        if state in FINAL_STATUS:
            status, reason = FINAL_STATUS[state], f"Prefect flow run {flow_run_id} ended {state}"
        elif process_gone(process):
            status = "KILLED"
            reason = f"its process ({describe(process)}) is gone (Prefect state {state or 'unknown'}): process killed"
        elif now - last_beat > stale_after():
            status = "KILLED"
            reason = f"no heartbeat for {now - last_beat:.0f} s (Prefect state {state or 'unknown'}): process killed"
        else:
            continue
        if status == "KILLED" and state in ("RUNNING", "PENDING", "CANCELLING"):
            _crash_in_prefect(flow_run_id, reason)
        end_runs(tracker, run.info.run_id, status, reason, end_ms=int(last_beat * 1000))
        log.warning("MLflow run %s of flow run %s ended as %s: %s", run.info.run_id, flow_run_id, status, redact(reason))
        reaped.append(Reaped(run.info.run_id, flow_run_id, status, reason))
    return reaped


def end_tracking_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect flow hook: end this flow run's MLflow parent (and RUNNING children) if still open.

    FAILED for a failed run, KILLED for a crashed or cancelled one. Never raises: a hook error
    would hide the run's own failure.
    """
    try:
        profile = (flow_run.parameters or {}).get("profile")
        uri = getattr(profile, "tracking_uri", None) or (profile or {}).get("tracking_uri")
        if not uri:
            return
        from quantdag.runtime.preflight import check_tracking
        from quantdag.runtime.tracking import Heartbeat

        check_tracking(uri)  # fail in seconds, not after MLflow's minutes of connection retries
        tracker = Tracker(uri)
        status = "FAILED" if state.is_failed() else "KILLED"
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=(f"tags.`prefect.flow_run_id` = '{flow_run.id}' and tags.`quantdag.role` = 'parent' "
                           "and attributes.status = 'RUNNING'"),
        )
        for run in runs:
            Heartbeat.stop(run.info.run_id)
            end_runs(tracker, run.info.run_id, status, f"Prefect flow run {state.type.value}: {state.message or ''}"[:500])
    except Exception as err:  # noqa: BLE001 - see docstring
        log.warning("could not end the MLflow runs of flow run %s: %s", getattr(flow_run, "id", "?"), redact(str(err)))
