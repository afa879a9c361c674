"""Shard records in the store and the fan-out's decisions: result taken once, dead runs retried, failures fail.

The Prefect side is the real server (``prefect_api``): the flow runs whose states the fan-out
reads are created there; only the submission is a local function that creates them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from quantdag.runtime.fanout import ShardPolicy, dead_reason, idempotency_key, run_shard
from quantdag.runtime.shard_lease import ShardHeartbeat, ShardRecord, label_slug
from quantdag.runtime.store import ArtifactRef


def _ref(n: int) -> ArtifactRef:
    return ArtifactRef(uri=f"/store/objects/quantizer-state/{n:064x}", sha256=f"{n:064x}", kind="quantizer-state",
                       files={}, meta={})


def test_record_paths_heartbeat_and_one_result(tmp_path: Path) -> None:
    record = ShardRecord.of(str(tmp_path), "parent-run", "image_text[1]+text[1]", 2)
    assert record.prefix == f"{tmp_path}/shards/parent-run/image_text-1-text-1/2"
    assert label_slug("text[10]") == "text-10"
    assert record.heartbeat() is None and record.expired_for() is None and record.result() is None
    with ShardHeartbeat(record, lease_seconds=0.8, flow_run_id="run-1"):
        first = record.heartbeat()["expires"]
        time.sleep(0.5)
        assert record.heartbeat()["expires"] > first, "the heartbeat renews every quarter lease"
        assert record.expired_for() < 0
    time.sleep(1.0)
    assert record.expired_for() > 0, "a heartbeat that stopped expires"
    record.finish({"text[1]": _ref(1)}, "run-1", 2)
    assert record.result() == {"text[1]": _ref(1)}
    with pytest.raises(RuntimeError, match="already holds a result: attempt 2 ran twice"):
        record.finish({"text[1]": _ref(2)}, "run-2", 2)


def test_record_works_on_s3(s3_endpoint: str) -> None:
    import uuid

    record = ShardRecord.of(f"s3://quantdag/shard-test-{uuid.uuid4().hex[:8]}", "p", "text", 0)
    record.beat(30, "r")
    assert 29 < record.heartbeat()["expires"] - time.time() <= 30
    record.finish({"text": _ref(3)}, "r", 0)
    assert record.result() == {"text": _ref(3)}


@pytest.fixture(scope="module")
def shard_flow(prefect_api: str):
    """A flow with a deployment-less run factory: creates flow runs on the real server in a given state."""
    from prefect import flow

    @flow(name="shard-fanout-probe")
    def probe() -> None:
        return None

    return probe


def _create_run(probe, state) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.create_flow_run(probe, state=state).id


def _set(run_id, state) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


def test_a_silent_run_is_crashed_and_the_next_attempt_delivers(tmp_path: Path, shard_flow) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    policy = ShardPolicy(lease_seconds=1.0, start_timeout_seconds=60, max_attempts=3, poll_seconds=0.2)
    store = str(tmp_path)
    submitted: list[tuple[str, str]] = []

    def submit(deployment, parameters, key, name):
        run_id = _create_run(shard_flow, Running())
        submitted.append((key, str(run_id)))
        record = ShardRecord(parameters["record"])
        if parameters["attempt"] == 0:
            record.beat(1.0, str(run_id))  # beats once, then its worker "dies"
        else:
            record.finish({"text[0]": _ref(7)}, str(run_id), parameters["attempt"])
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run_id)

    polls = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        assert len(polls) < 200, "the silent run was never declared dead"
        time.sleep(seconds)

    outcome = run_shard("calibrate-shard/calibrate-shard", {"x": 1}, store, "parent", "text[0]", policy, submit=submit,
                        sleep=sleep)
    assert outcome.refs == {"text[0]": _ref(7)} and outcome.attempt == 1
    assert [key for key, _ in submitted] == [idempotency_key("parent", "text[0]", 0), "parent/text[0]/1"]
    dead = submitted[0][1]
    assert list(outcome.crashed) == [dead] and "no shard heartbeat" in outcome.crashed[dead]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(dead).state
    assert state.type.value == "CRASHED" and "resubmitted as attempt 1" in state.message


def test_a_failed_run_fails_the_shard_without_retry(tmp_path: Path, shard_flow) -> None:
    from prefect.states import Failed, Running

    policy = ShardPolicy(lease_seconds=30.0, start_timeout_seconds=60, max_attempts=3, poll_seconds=0.2)
    calls = []

    def submit(deployment, parameters, key, name):
        from prefect.client.orchestration import get_client

        run_id = _create_run(shard_flow, Running())
        calls.append((key, run_id))
        ShardRecord(parameters["record"]).beat(30.0, str(run_id))
        with get_client(sync_client=True) as client:
            return client.read_flow_run(run_id)

    def sleep(seconds: float) -> None:  # the parent saw it running; then the shard's own error ends it
        _set(calls[-1][1], Failed(message="calibrate: text shard 4 of 5 has no rows"))

    with pytest.raises(RuntimeError, match="failed: calibrate: text shard 4 of 5 has no rows"):
        run_shard("d/d", {}, str(tmp_path), "parent", "text[4]", policy, submit=submit, sleep=sleep)
    assert len(calls) == 1, "a shard's own error is not retried"


def test_a_run_that_never_starts_its_heartbeat_is_dead_after_the_start_timeout(tmp_path: Path, shard_flow) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Pending

    run_id = _create_run(shard_flow, Pending())
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    record = ShardRecord.of(str(tmp_path), "p", "text", 0)
    policy = ShardPolicy(lease_seconds=5, start_timeout_seconds=30, max_attempts=1)
    taken = run.state.timestamp.timestamp()
    assert dead_reason(record, run, policy, now=taken + 10) is None
    assert "never started its heartbeat" in dead_reason(record, run, policy, now=taken + 31)
    record.beat(5, str(run_id))
    assert dead_reason(record, run, policy, now=time.time() + 1) is None, "a beating run lives"
    assert "no shard heartbeat" in dead_reason(record, run, policy, now=time.time() + 6)
