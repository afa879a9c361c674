"""A killed flow run's MLflow runs end KILLED as soon as its process is known gone, not after the heartbeat goes stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fault_rows import fault_row
from quantdag.runtime.liveness import PROCESS_TAG, process_gone, process_identity


def test_process_identity_tells_a_live_a_dead_and_a_foreign_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = process_identity(child.pid)
    assert process_gone(identity) is False
    child.kill()
    child.wait()
    assert process_gone(identity) is True
    assert process_gone(process_identity()) is False
    host, boot, namespace, pid, ticks = process_identity().split("|")
    assert process_gone("|".join(("another-host", boot, namespace, pid, ticks))) is None
    assert process_gone("|".join((host, boot, namespace, pid, str(int(ticks) - 1)))) is True, "a reused pid"
    assert process_gone(None) is None and process_gone("garbage") is None


def test_killed_run_is_ended_killed_by_a_rerun_within_the_stale_window(tmp_path: Path, prefect_api: str,
                                                                       monkeypatch: pytest.MonkeyPatch, request) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from quantdag.runtime.reaper import reap_stale_runs
    from quantdag.runtime.tracking import Heartbeat, Tracker

    row = fault_row(request, "kill -9 of a run, rerun within 150 s",
                    "the rerun's reaper ends the killed run's MLflow runs KILLED and crashes it in Prefect")
    monkeypatch.setenv("QUANTDAG_STALE_AFTER_SECONDS", "600")  # the heartbeat alone would wait 10 minutes
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    identity = process_identity(victim.pid)

    @flow(name="killed-run")
    def killed() -> None:
        pass

    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(killed)
        client.set_flow_run_state(flow_run.id, Running(), force=True)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    parent = tracker.parent(str(flow_run.id), "quantize-killed", {}, {})
    Heartbeat.stop(parent)
    tracker.client.set_tag(parent, PROCESS_TAG, identity)
    child = tracker.client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    reaped = reap_stale_runs(uri, "the-rerun")
    assert [(r.run_id, r.status) for r in reaped] == [(parent, "KILLED")], reaped
    assert f"its process (pid {victim.pid} on" in reaped[0].reason
    assert {tracker.client.get_run(run).info.status for run in (parent, child)} == {"KILLED"}
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.type.value == "CRASHED"
    row.observed("parent and child KILLED at once (heartbeat fresh, stale window 600 s), Prefect run CRASHED")
