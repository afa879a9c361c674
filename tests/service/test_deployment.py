"""quantdag as a service: the demo deployment driven through ``prefect deployment run`` against a real
Prefect server, a process worker, an MLflow server (SQLite + S3 artifacts) and moto S3.

One session deploys the repository's prefect.yaml; the tests below run in file order and share it
(each flow run of the tiny model costs 20-60 s here, mostly process start-up and imports).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import s3fs

from harness import (Stack, alive, cli, flow_logs, kill_groups, kill_session, read_flow_run, task_result, task_states,
                     wait_for)

pytestmark = pytest.mark.slow

UNCACHED = {"preflight", "reap_stale_runs", "resolve_base"}
"""Steps that run on every attempt by design (probes, the reaper, resolving the base's identity)."""


def cached_steps(states: dict[str, str]) -> dict[str, str]:
    return {step: state for step, state in states.items() if step not in UNCACHED}


def calibration_step(states: dict[str, str]) -> str:
    """The calibration step's name (``calibrate`` whatever branches it ran)."""
    (step,) = [name for name in states if name.startswith("calibrate")]
    return step


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_prefect_yaml_deploys_every_profile_with_schema_pool_and_gpu_slot(stack: Stack) -> None:
    from prefect.client.orchestration import get_client

    from conf import load_profile

    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        demo = client.read_deployment_by_name("quantize/demo")
        pool = client.read_work_pool(demo.work_pool_name)
        gpu0 = client.read_global_concurrency_limit_by_name("gpu-0")
    assert {"demo", "qwen3-6-27b-nvfp4", "smollm2-nvfp4"} <= names
    assert pool.type == "process"
    assert demo.enforce_parameter_schema
    schema = demo.parameter_openapi_schema
    assert schema["properties"]["profile"]["$ref"] == "#/definitions/Profile"
    assert {"BaseModelSpec", "RecipeSpec", "TextSource", "EvalSpec"} <= set(schema["definitions"])
    env = demo.job_variables["env"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and gpu0.limit == 1
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"].startswith("remote-file-system/")
    expected = load_profile("demo", env={"QUANTDAG_HOME": str(stack.home), "QUANTDAG_ARTIFACTS": "s3://quantdag/artifacts",
                                         "MLFLOW_TRACKING_URI": stack.mlflow})
    assert demo.parameters["profile"] == json.loads(expected.model_dump_json()), "default parameters = resolved profile"

    bad = cli("deployment", "run", "quantize/demo", "--param", 'profile={"name": "demo"}', env=stack.cli_env, check=False)
    assert bad.returncode != 0 and "base" in bad.stdout + bad.stderr, "the server validates against the pydantic schema"


@pytest.fixture(scope="module")
def first_run(stack: Stack):
    run = stack.run()
    assert run.state.type.value == "COMPLETED", run.state.message
    return run


def test_first_run_writes_artifacts_results_and_lineage_to_s3_and_mlflow(stack: Stack, first_run) -> None:
    from quantdag.runtime.store import ArtifactRef, ArtifactStore

    result = stack.flow_result(first_run)
    checkpoint = ArtifactRef(**result["checkpoint"])
    assert checkpoint.uri.startswith("s3://quantdag/artifacts/objects/checkpoint/")
    ArtifactStore("s3://quantdag/artifacts", cache_dir=str(stack.home / "verify-cache")).verify(checkpoint)
    fs = s3()
    records = [p for p in fs.ls("quantdag/artifacts/prefect-results") if not p.endswith("/locks")]
    assert len(records) >= len(cached_steps(task_states(first_run.id))), "task results persist on S3"
    (parent,) = stack.parent_runs(str(first_run.id))
    assert parent.info.status == "FINISHED" and parent.data.tags["profile"] == "demo"
    artifacts = fs.find("mlflow/artifacts")
    assert any(p.endswith("resolved_profile.json") for p in artifacts), "MLflow artifacts land in the S3 destination"


def test_new_run_with_same_parameters_hits_the_cache_for_every_step(stack: Stack, first_run) -> None:
    again = stack.run()
    assert again.state.type.value == "COMPLETED", again.state.message
    states = cached_steps(task_states(again.id))
    assert states and set(states.values()) == {"Cached"}, states
    assert stack.flow_result(again)["checkpoint"] == stack.flow_result(first_run)["checkpoint"]
    (parent,) = stack.parent_runs(str(again.id))
    assert parent.info.run_id != stack.flow_result(first_run)["mlflow_run_id"], "a new flow run gets its own parent"


def test_ui_retry_on_a_fresh_worker_reruns_only_the_failed_step_and_reattaches_mlflow(stack: Stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    failed = stack.run("revision=12345", env=stack.fault_env("raise", "eval-report"))
    assert failed.state.type.value == "FAILED"
    assert failed.parameters["revision"] == 12345, "the CLI parsed the revision as JSON"
    first = task_states(failed.id, attempt=1)
    assert first["evaluate"] == "Failed" and first["export"] == "Completed", first
    (parent,) = stack.parent_runs(str(failed.id))
    assert parent.info.status == "FAILED"
    assert parent.data.tags["base.revision"] == "12345", "an int revision reaches the flow as a string"

    stack.workers.stop()
    stack.workers.start("fresh")  # a new worker process with an empty PREFECT_HOME: nothing local to reuse
    with get_client(sync_client=True) as client:  # what the UI's Retry button sends
        client.set_flow_run_state(failed.id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                                   message="Retry from the UI"), force=True)
    time.sleep(2)
    retried = wait_for(str(failed.id))
    assert retried.state.type.value == "COMPLETED", retried.state.message
    second = cached_steps(task_states(failed.id, attempt=2))
    assert second.pop("evaluate") == "Completed"
    assert second and set(second.values()) == {"Cached"}, second
    (parent_again,) = stack.parent_runs(str(failed.id))
    assert parent_again.info.run_id == parent.info.run_id, "the retry reattached to its MLflow parent"
    assert parent_again.info.status == "FINISHED" and parent_again.data.tags["quantdag.attempts"] == "2"
    local = [p for p in stack.workers.service_dir.glob("worker-home-*/storage/*")]
    assert not local, f"results must not be kept on the worker's disk: {local}"


def test_two_identical_runs_at_once_compute_each_step_once(stack: Stack) -> None:
    runs = [stack.run("revision=concurrent", wait=False) for _ in range(2)]
    done = [wait_for(str(run.id), timeout=400) for run in runs]
    assert all(run.state.type.value == "COMPLETED" for run in done), [run.state.message for run in done]
    states = [cached_steps(task_states(run.id)) for run in done]
    for step in states[0]:  # steps that do not depend on the revision (fetch_text) were cached before
        assert [states[0][step], states[1][step]].count("Completed") <= 1, (step, states)
    for step in (calibration_step(states[0]), "merge_amax", "export", "evaluate"):
        assert sorted([states[0][step], states[1][step]]) == ["Cached", "Completed"], (step, states)
    refs = [stack.flow_result(run)["checkpoint"] for run in done]
    assert refs[0] == refs[1]
    manifest = json.loads(s3().cat_file(f"{refs[0]['uri'].removeprefix('s3://')}/MANIFEST.json"))
    assert manifest["sha256"] == refs[0]["sha256"]


def test_unreachable_s3_or_mlflow_fails_before_any_model_loads_naming_the_endpoint(stack: Stack) -> None:
    from services import free_port

    profile = json.loads(cli("deployment", "inspect", "quantize/demo", "--output", "json",
                             env=stack.cli_env).stdout)["parameters"]["profile"]
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    dead_s3 = f"http://127.0.0.1:{free_port()}"
    runs = [stack.run(f"profile={json.dumps({**profile, 'tracking_uri': dead_mlflow})}", wait=False),
            stack.run(env={"AWS_ENDPOINT_URL": dead_s3}, wait=False)]
    for run, endpoint in zip(runs, (dead_mlflow, dead_s3)):
        finished = wait_for(str(run.id))
        assert finished.state.type.value == "FAILED"
        assert endpoint in finished.state.message, finished.state.message
        assert task_states(run.id) == {"preflight": "Failed"}, "nothing after preflight ran"


def test_kill_9_during_calibration_and_export_then_rerun_completes(stack: Stack) -> None:
    from prefect.client.orchestration import get_client

    from quantdag.runtime.store import ArtifactRef, ArtifactStore

    fs = s3()
    # one more module kept in BF16, so that this checkpoint is new (the same recipe gives the same bytes)
    default = json.loads(cli("deployment", "inspect", "quantize/demo", "--output", "json",
                             env=stack.cli_env).stdout)["parameters"]["profile"]
    recipe = {**default["recipe"], "exclude_modules": [*default["recipe"]["exclude_modules"], "*layers.1.mlp.down_proj"]}
    profile = f"profile={json.dumps({**default, 'recipe': recipe})}"
    # 1. die while the calibration state is being published (all files copied, manifest not yet)
    k1 = stack.run(profile, env=stack.fault_env("pause", "quantizer-state"), wait=False)
    info1 = stack.wait_marker(str(k1.id), "pause", "quantizer-state")
    kill_groups(stack.workers.current.process.pid)
    kill_session(info1["sid"])
    killed_at = time.monotonic()
    assert not alive(info1["pid"])
    partial = info1["path"].rsplit("/", 1)[0]
    assert fs.ls(partial) and not fs.exists(info1["path"]), "files without a manifest"

    # 2. rerun on another GPU: takes over the dead lease, recomputes calibration, dies during export
    stack.workers.start("after-kill-1")
    time.sleep(max(0.0, 10 - (time.monotonic() - killed_at)))  # past QUANTDAG_STALE_AFTER_SECONDS
    k2 = stack.run(profile, env={**stack.fault_env("pause", "checkpoint"), "CUDA_VISIBLE_DEVICES": "1"}, wait=False)
    info2 = stack.wait_marker(str(k2.id), "pause", "checkpoint")
    kill_groups(stack.workers.current.process.pid)
    kill_session(info2["sid"])
    killed_at = time.monotonic()
    assert not alive(info2["pid"])
    at_kill = task_states(k2.id)
    calibrate = calibration_step(at_kill)
    assert at_kill[calibrate] == "Completed" and at_kill["fetch_text"] == "Cached", at_kill

    # 3. rerun again: finishes, reusing everything before export
    stack.workers.start("after-kill-2")
    time.sleep(max(0.0, 10 - (time.monotonic() - killed_at)))
    rerun = stack.run(profile, env={"CUDA_VISIBLE_DEVICES": "2"})
    assert rerun.state.type.value == "COMPLETED", rerun.state.message
    states = cached_steps(task_states(rerun.id))
    assert states["export"] == "Completed" and states["merge_amax"] == "Cached" and states[calibrate] == "Cached", states
    checkpoint = ArtifactRef(**stack.flow_result(rerun)["checkpoint"])
    assert f"{checkpoint.uri.removeprefix('s3://')}/MANIFEST.json" == info2["path"]
    ArtifactStore("s3://quantdag/artifacts", cache_dir=str(stack.home / "verify-kill")).verify(checkpoint)
    used = task_result(str(rerun.id), calibrate)  # what merge_amax of the finished run read
    for state in used.values() if isinstance(used, dict) else [used]:
        assert state.uri != f"s3://{partial}" and ArtifactStore("s3://quantdag/artifacts").exists(state)
    assert not fs.exists(info1["path"]), "the half-published state (timings differ, so another sha) stays unreadable"
    leftover = [p for p in fs.find("quantdag/artifacts/prefect-results/locks") if p.endswith(".lease")]
    assert not leftover, f"leases of killed holders were taken over and released: {leftover}"

    # the killed runs' records end instead of staying RUNNING forever
    for killed in (k1, k2):
        (parent,) = stack.parent_runs(str(killed.id))
        assert parent.info.status == "KILLED", (parent.info.status, parent.data.tags.get("quantdag.end_reason"))
        assert "no heartbeat" in parent.data.tags["quantdag.end_reason"]
        assert read_flow_run(str(killed.id)).state.type.value == "CRASHED"
    # and the GPU slots the killed runs held are given back when their 60 s leases run out
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while any(client.read_global_concurrency_limit_by_name(n).active_slots for n in ("gpu-0", "gpu-1")):
            assert time.monotonic() < deadline, "GPU slots of killed runs were never released"
            time.sleep(3)


def test_secrets_never_reach_mlflow_params_tags_or_prefect_logs(stack: Stack) -> None:
    from conftest import FAKE_SECRETS

    markers = [json.loads(p.read_text()) for p in stack.fault_dir.glob("*.json")]
    assert any(set(m["secrets_in_env"]) == set(FAKE_SECRETS) for m in markers), "the flow runs had the secrets"
    client = stack.mlflow_client()
    experiment = client.get_experiment_by_name("quantdag")
    recorded = []
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        recorded += [*run.data.params.values(), *run.data.tags.values()]
    assert len(recorded) > 100
    for flow_run_id in stack.flow_runs:
        recorded += flow_logs(flow_run_id)
        recorded.append(json.dumps(read_flow_run(flow_run_id).parameters))
    recorded += [log.read_text() for log in Path(stack.workers.service_dir).glob("worker-*.log")]
    for name, secret in FAKE_SECRETS.items():
        leaks = [text[:200] for text in recorded if secret in text]
        assert not leaks, f"{name} leaked into: {leaks}"
