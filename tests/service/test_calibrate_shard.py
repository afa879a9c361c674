"""Calibration fanned out over a work pool: shards as flow runs of the ``calibrate-shard`` deployment.

The quantize flow runs here (``calibration_pool`` in its profile); its two text shards run on two
process workers of the pool, each with a working directory, HOME, PREFECT_HOME and QUANTDAG_HOME
of its own: they share nothing with each other or with this process but the Prefect server, the
S3 artifact store (moto) and MLflow (and the read-only base checkpoint, as a model mount would).
Worker A is killed with ``kill -9`` (its process group and its shard's session) while its shard
publishes its state; Prefect still shows that flow run Running, the shard's heartbeat in S3 stops,
and the quantize flow marks it Crashed and starts the next attempt, which worker B runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import s3fs

from conftest import FAKE_SECRETS, FAST, POOL
from harness import FAULTS, alive, kill_groups, kill_session, store_damage
from services import start_worker

pytestmark = pytest.mark.slow

SHARD_DEPLOYMENT = "calibrate-shard/calibrate-shard"
LEASE_SECONDS = 8.0


@pytest.fixture
def two_workers(stack, service_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Workers ``shard-a`` (pauses at its first quantizer-state manifest) and ``shard-b``, one flow run at a time.

    The stack's own worker is stopped meanwhile (shard runs must go to these two) and restarted after.
    """
    stack.workers.stop()
    fault_dir = tmp_path_factory.mktemp("shard-faults")
    workers = {}
    try:
        for name in ("shard-a", "shard-b"):
            home = tmp_path_factory.mktemp(f"{name}-home")
            env = {**FAST, **FAKE_SECRETS, "HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                   "QUANTDAG_HOME": str(home / "quantdag")}
            if name == "shard-a":
                path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
                env |= {"PYTHONPATH": path, "QUANTDAG_FAULT": "pause:quantizer-state", "QUANTDAG_FAULT_DIR": str(fault_dir)}
            workers[name] = start_worker(service_dir, POOL, name, env, limit=1, cwd=home)
        yield workers, fault_dir
    finally:
        for worker in workers.values():
            worker.stop()
        stack.workers.start("main-after-shards")


def _kill_when_paused(fault_dir: Path, worker_pid: int, killed: dict, timeout: float = 300) -> None:
    """Wait for worker A's shard to pause at its state's manifest; kill -9 the worker and the shard's session."""
    deadline = time.monotonic() + timeout
    while not (markers := list(fault_dir.glob("*-pause-quantizer-state.json"))):
        if time.monotonic() > deadline:
            killed["error"] = f"worker A's shard never reached its quantizer-state manifest in {timeout:.0f} s"
            return
        time.sleep(0.3)
    info = json.loads(markers[0].read_text())
    kill_groups(worker_pid)
    kill_session(info["sid"])
    killed |= {"flow_run_id": markers[0].name.split("-pause-")[0], "pid": info["pid"], "path": info["path"]}


def _shard_runs(store: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["calibrate-shard"])),
                                     limit=200)
    return [run for run in runs if run.parameters.get("artifact_store") == store]


def test_shards_fan_out_over_two_workers_and_a_killed_worker_costs_no_shard(stack, two_workers, request) -> None:
    from mlflow.tracking import MlflowClient

    from conf import load_profile
    from conf.schema import CalibrationPoolSpec
    from fault_rows import fault_row
    from flows.quantize import quantize

    row = fault_row(request, "kill -9 of a pool worker (and its shard's session) mid-shard",
                    "the shard's heartbeat stops; the run is marked Crashed and rerun on the other worker; "
                    "merge bit-identical to the one-load run; every shard merged once")
    workers, fault_dir = two_workers
    store = f"s3://quantdag/shard-pool-{uuid.uuid4().hex[:8]}"
    one_load = load_profile("demo", {"name": "shard-pool", "artifact_store": store, "device": "cpu"},
                            env={"QUANTDAG_HOME": str(stack.home), "MLFLOW_TRACKING_URI": stack.mlflow})
    baseline = quantize(one_load)  # one call, one model load, in this process
    pooled = one_load.model_copy(update={
        "text": one_load.text.model_copy(update={"shards": 2}),
        "calibration_pool": CalibrationPoolSpec(lease_seconds=LEASE_SECONDS, start_timeout_seconds=240, max_attempts=3)})

    killed: dict = {}
    killer = threading.Thread(target=_kill_when_paused, args=(fault_dir, workers["shard-a"].process.pid, killed))
    killer.start()
    try:
        result = quantize(pooled)
    finally:
        killer.join(timeout=330)
    assert "error" not in killed, killed.get("error")
    assert not alive(killed["pid"]), "the paused shard process was killed"

    assert result["checkpoint"]["sha256"] == baseline["checkpoint"]["sha256"], \
        "the pool's merged amax must give the one-load run's checkpoint, bit for bit"
    runs = _shard_runs(store)
    by_label: dict[str, list] = {}
    for run in runs:
        by_label.setdefault(run.name.rsplit("-", 1)[0].removeprefix("calibrate-shard-"), []).append(run)
    assert sorted(by_label) == ["text[0]", "text[1]"], sorted(by_label)
    states = {label: sorted(r.state.type.value for r in group) for label, group in by_label.items()}
    assert len(runs) == 3 and sorted(states.values()) == [["COMPLETED"], ["COMPLETED", "CRASHED"]], states
    (dead,) = [r for r in runs if r.state.type.value == "CRASHED"]
    assert str(dead.id) == killed["flow_run_id"], "the crashed run is the one whose worker was killed"
    assert "no shard heartbeat" in dead.state.message and "resubmitted as attempt 1" in dead.state.message
    assert all(r.parameters["attempt"] == int(r.name.rsplit("-", 1)[1]) for r in runs)

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    done = sorted(p.split("/shards/", 1)[1] for p in fs.find(f"{store.removeprefix('s3://')}/shards") if p.endswith("/done.json"))
    assert len(done) == 2 and {p.split("/")[1] for p in done} == {"text-0", "text-1"}, f"one result per shard: {done}"
    assert not fs.exists(killed["path"]), "the killed attempt's state was never published"

    client = MlflowClient(stack.mlflow)
    children = client.search_runs([client.get_experiment_by_name("quantdag").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    steps = sorted(run.data.tags["quantdag.step"] for run in children)
    assert steps.count("calibrate_text[0]") == 1 and steps.count("calibrate_text[1]") == 1, steps
    (merge,) = [run for run in children if run.data.tags["quantdag.step"] == "merge_amax"]
    manifest = json.loads(fs.cat_file(f"{merge.data.params['artifact.uri'].removeprefix('s3://')}/MANIFEST.json"))
    assert manifest["meta"]["merged_from"] == ["text[0]", "text[1]"], "each shard merged exactly once"
    row.observed(f"3 shard runs (2 COMPLETED, the killed one CRASHED after its {LEASE_SECONDS:g} s lease); "
                 f"0 lost shards; checkpoint = one-load sha {baseline['checkpoint']['sha256'][:12]}", store_damage(store))
