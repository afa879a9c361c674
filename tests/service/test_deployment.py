"""quantdag as a service: the demo deployment driven through ``prefect deployment run`` against a real
Prefect server, a process worker, an MLflow server (SQLite + S3 artifacts) and moto S3.

One session deploys the repository's prefect.yaml; the tests below run in file order and share it
(each flow run of the tiny model costs 20-60 s here, mostly process start-up and imports).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import s3fs

from fault_rows import fault_row
from harness import (BIN, REPO, Stack, alive, cli, flow_logs, kill_groups, kill_session, read_flow_run, store_damage,
                     stored_texts, task_result, task_states, wait_for)

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


def default_profile(stack: Stack) -> dict:
    """The deployment's default ``profile`` parameter (the resolved demo profile)."""
    return json.loads(cli("deployment", "inspect", "quantize/demo", "--output", "json",
                          env=stack.cli_env).stdout)["parameters"]["profile"]


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


def test_two_identical_runs_at_once_compute_each_step_once(stack: Stack, request) -> None:
    row = fault_row(request, "duplicate triggers (two identical runs at once)",
                    "each step computed once (the other run waits on the step lease, then hits); same checkpoint")
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
    row.observed("both COMPLETED; calibrate, merge_amax, export, evaluate: one Completed + one Cached each; "
                 "one checkpoint", store_damage())


def test_unreachable_s3_or_mlflow_fails_before_any_model_loads_naming_the_endpoint(stack: Stack, request) -> None:
    from services import free_port

    row = fault_row(request, "unreachable S3 / unreachable MLflow",
                    "preflight fails naming the endpoint; no step after it runs")
    profile = default_profile(stack)
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    dead_s3 = f"http://127.0.0.1:{free_port()}"
    runs = [stack.run(f"profile={json.dumps({**profile, 'tracking_uri': dead_mlflow})}", wait=False),
            stack.run(env={"AWS_ENDPOINT_URL": dead_s3}, wait=False)]
    for run, endpoint in zip(runs, (dead_mlflow, dead_s3)):
        finished = wait_for(str(run.id))
        assert finished.state.type.value == "FAILED"
        assert endpoint in finished.state.message, finished.state.message
        assert task_states(run.id) == {"preflight": "Failed"}, "nothing after preflight ran"
    row.observed("both FAILED in preflight naming the dead endpoint; no other task ran", store_damage())


MODEL_STEPS = {"bf16_reference": "bf16-reference", "calibrate": "quantizer-state", "export": "checkpoint",
               "evaluate": "eval-report"}
"""Each step that loads a model, and the kind of the artifact whose manifest it is killed at."""


def _step(states: dict[str, str], step: str) -> str:
    return calibration_step(states) if step == "calibrate" else step


def test_kill_9_at_each_model_step_then_rerun_completes(stack: Stack, request) -> None:
    from prefect.client.orchestration import get_client

    from quantdag.runtime.store import ArtifactRef, ArtifactStore

    row = fault_row(request, "kill -9 (flow run and worker) at each model step, each rerun within 150 s",
                    "each rerun ends the killed run KILLED at once, recomputes only what was killed; the last completes")
    fs = s3()
    # a new recipe and eval (the same ones give the same bytes, cached): every model step recomputes
    default = default_profile(stack)
    recipe = {**default["recipe"], "exclude_modules": [*default["recipe"]["exclude_modules"], "*layers.1.mlp.down_proj"]}
    profile = f"profile={json.dumps({**default, 'recipe': recipe, 'eval': {**default['eval'], 'max_windows': 3}})}"
    slow_reaper = {"QUANTDAG_STALE_AFTER_SECONDS": "600"}  # a stale heartbeat would take 10 minutes here
    killed = []
    for gpu, (step, kind) in enumerate(MODEL_STEPS.items()):
        run = stack.run(profile, env={**stack.fault_env("pause", kind), "CUDA_VISIBLE_DEVICES": str(gpu), **slow_reaper},
                        wait=False)
        info = stack.wait_marker(str(run.id), "pause", kind)
        kill_groups(stack.workers.current.process.pid)
        kill_session(info["sid"])
        assert not alive(info["pid"])
        at_kill = task_states(run.id)
        if killed:  # the step killed last time was recomputed, the ones before it were cache hits
            previous = _step(at_kill, killed[-1][1])
            assert at_kill[previous] == "Completed", (previous, at_kill)
        partial = info["path"].rsplit("/", 1)[0]
        assert fs.ls(partial) and not fs.exists(info["path"]), "files without a manifest"
        killed.append((run, step, info))
        stack.workers.start(f"after-kill-{gpu}")  # the node comes back: a new worker, nothing local kept

    rerun = stack.run(profile, env={"CUDA_VISIBLE_DEVICES": str(len(MODEL_STEPS)), **slow_reaper})
    assert rerun.state.type.value == "COMPLETED", rerun.state.message
    states = cached_steps(task_states(rerun.id))
    assert states["evaluate"] == "Completed", states
    assert all(states[_step(states, step)] == "Cached" for step in list(MODEL_STEPS)[:-1]), states
    checkpoint = ArtifactRef(**stack.flow_result(rerun)["checkpoint"])
    ArtifactStore("s3://quantdag/artifacts", cache_dir=str(stack.home / "verify-kill")).verify(checkpoint)
    # leases of killed holders were taken over and released, or (a key no rerun needed: the code
    # changed in between) have expired: none blocks a later run
    leases = [json.loads(fs.cat_file(p)) for p in fs.find("quantdag/artifacts/prefect-results/locks") if p.endswith(".lease")]
    assert all(lease["expires"] < time.time() for lease in leases), f"live leases of killed holders: {leases}"

    # the killed runs' records end at once (a heartbeat seconds old, stale window 600 s): their processes are gone
    for killed_run, _, _ in killed:
        (parent,) = stack.parent_runs(str(killed_run.id))
        assert parent.info.status == "KILLED", (parent.info.status, parent.data.tags.get("quantdag.end_reason"))
        assert "is gone" in parent.data.tags["quantdag.end_reason"], parent.data.tags["quantdag.end_reason"]
        assert read_flow_run(str(killed_run.id)).state.type.value == "CRASHED"
    damage = store_damage()
    row.observed(f"4 kills; each rerun recomputed only the killed step; killed runs KILLED + CRASHED; last run "
                 f"COMPLETED ({', '.join(f'{k}: {v}' for k, v in states.items() if k in MODEL_STEPS or k.startswith('calibrate'))})",
                 damage)
    # and the GPU slots the killed runs held are given back when their 60 s leases run out
    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while any(client.read_global_concurrency_limit_by_name(f"gpu-{i}").active_slots for i in range(len(MODEL_STEPS))):
            assert time.monotonic() < deadline, "GPU slots of killed runs were never released"
            time.sleep(3)


def test_checkpoint_changed_in_the_store_after_its_audit_is_recomputed_not_registered(stack: Stack, request) -> None:
    from quantdag.runtime.store import ArtifactRef, ArtifactStore

    row = fault_row(request, "checkpoint changed in the store after its audit (lm_head removed from both exclude lists)",
                    "the export's hit is refused and the export recomputed (stored copy replaced); only audited bytes "
                    "are registered, under the new name too")
    fs = s3()
    audited = stack.run()  # the default profile, audited (cache hits when the first run's code is still current)
    assert audited.state.type.value == "COMPLETED", audited.state.message
    checkpoint = ArtifactRef(**stack.flow_result(audited)["checkpoint"])
    key = checkpoint.uri.removeprefix("s3://")
    for name, section, field in (("hf_quant_config.json", "quantization", "exclude_modules"),
                                 ("config.json", "quantization_config", "ignore")):
        data = json.loads(fs.cat_file(f"{key}/{name}"))
        assert "lm_head" in data[section][field], (name, data[section][field])
        data[section][field] = [p for p in data[section][field] if p != "lm_head"]
        fs.pipe_file(f"{key}/{name}", json.dumps(data, indent=2).encode())
    renamed = {**default_profile(stack), "registered_model_name": "demo-renamed"}
    run = stack.run(f"profile={json.dumps(renamed)}")
    assert run.state.type.value == "COMPLETED", run.state.message
    states = cached_steps(task_states(run.id))
    assert states["export"] == "Completed", f"a damaged checkpoint was served as a cache hit: {states}"
    refused = [line for line in flow_logs(str(run.id)) if "points to damaged artifacts" in line]
    assert refused and checkpoint.sha256[:12] in refused[0], "the export recomputed, but not because of the damage"
    result = stack.flow_result(run)
    version = stack.mlflow_client().get_model_version("demo-renamed", result["model_version"])
    audit = task_result(str(run.id), "audit")
    assert version.tags["checkpoint_sha256"] == result["checkpoint"]["sha256"] == audit.meta["checkpoint_sha256"]
    assert version.tags["audit_report_sha256"] == audit.sha256
    repaired = ArtifactRef(**result["checkpoint"])
    ArtifactStore("s3://quantdag/artifacts", cache_dir=str(stack.home / "verify-repaired")).verify(repaired)
    assert "lm_head" in json.loads(fs.cat_file(f"{repaired.uri.removeprefix('s3://')}/hf_quant_config.json"))[
        "quantization"]["exclude_modules"]
    row.observed(f"export {states['export']} (hit refused), audit {states['audit']}, evaluate {states['evaluate']}; "
                 f"demo-renamed v{result['model_version']} = audited sha {repaired.sha256[:12]}; stored copy repaired",
                 store_damage())


def test_secrets_never_reach_any_store(stack: Stack, request) -> None:
    from conftest import FAKE_SECRETS, PLANTED_URL_PASSWORD

    row = fault_row(request, "secrets in the environment, a password in a profile URL",
                    "URL refused at validation (masked); no planted secret in MLflow (DB, params, tags, artifacts), "
                    "Prefect (DB, logs, parameters), service logs or the artifact store")
    offered = subprocess.run([str(BIN / "quantdag"), "run", "demo", "--set",
                              f"tracking_uri=http://quantdag:{PLANTED_URL_PASSWORD}@{stack.mlflow.split('://', 1)[1]}"],
                             cwd=REPO, env={**os.environ, **stack.cli_env}, capture_output=True, text=True, timeout=300)
    assert offered.returncode == 2 and "holds a credential in its URL" in offered.stderr, offered.stderr[-2000:]
    assert PLANTED_URL_PASSWORD not in offered.stdout + offered.stderr

    markers = [json.loads(p.read_text()) for p in stack.fault_dir.glob("*.json")]
    assert any(set(m["secrets_in_env"]) == set(FAKE_SECRETS) for m in markers), "the flow runs had the secrets"
    client = stack.mlflow_client()
    experiment = client.get_experiment_by_name("quantdag")
    recorded = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        recorded[f"mlflow run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
    assert len(recorded) > 10
    for flow_run_id in stack.flow_runs:
        recorded[f"prefect logs {flow_run_id}"] = "\n".join(flow_logs(flow_run_id))
        recorded[f"prefect parameters {flow_run_id}"] = json.dumps(read_flow_run(flow_run_id).parameters)
    recorded |= stored_texts(stack.workers.service_dir, ["s3://mlflow", "s3://quantdag"])
    planted = {**FAKE_SECRETS, "URL password": PLANTED_URL_PASSWORD}
    leaks = [f"{name} in {where}" for where, text in recorded.items() for name, secret in planted.items() if secret in text]
    assert not leaks, leaks
    row.observed(f"refused (exit 2, masked); {len(planted)} secrets grepped in {len(recorded)} records and files: no leak")
