"""The watch-base-releases flow against a local Hub mirror, a real Prefect server and a real MLflow server.

A deployment of the real quantize flow is registered on the test server; no worker runs, so the
flow runs the watcher starts stay Scheduled and the tests read them back: how many, with which
revision, under which idempotency key.
"""

from __future__ import annotations

import secrets
import uuid
from uuid import UUID

import pytest
from hub_mirror import HubMirror, serve_mirror

from conf.watch import WatchConfig, load_watch
from flows.watch import DEPLOYMENT_NAME, watch_base_releases, watch_deployment
from tasks.watch.hub_watch import VARIABLE_PREFIX, state_variable_name

PROFILE = "qwen3.6-27b-nvfp4"
QUANTIZE = "quantize/qwen3-6-27b-nvfp4"
EXACT = {"repo": "Qwen/Qwen3.6-27B", "branch": "main", "profile": PROFILE}
PATTERN = {"author": "Qwen", "name_glob": "Qwen3.6-*", "exclude": ["*-FP8*"], "profile": PROFILE}


def _sha() -> str:
    return secrets.token_hex(20)


def _config(*entries: dict) -> WatchConfig:
    return WatchConfig.model_validate({"cron": "0 */6 * * *", "entries": list(entries or (EXACT, PATTERN)),
                                       "token_secret": "hf-token-not-configured"})


@pytest.fixture(scope="module")
def quantize_deployment(prefect_api: str) -> UUID:
    """``quantize/qwen3-6-27b-nvfp4``: the real quantize flow, no work pool (nothing executes it)."""
    from flows.quantize import quantize

    return quantize.to_deployment(name="qwen3-6-27b-nvfp4").apply()


@pytest.fixture
def hub(prefect_api: str, mlflow_server: str, quantize_deployment: UUID, monkeypatch: pytest.MonkeyPatch):
    """The mirror as HF_ENDPOINT, MLflow for the registry check, and no watcher state left from other tests."""
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with get_client(sync_client=True) as client:
        for variable in client.read_variables():
            if variable.name.startswith(VARIABLE_PREFIX):
                client.delete_variable_by_name(variable.name)
    with serve_mirror(monkeypatch) as mirror:
        yield mirror


def quantize_runs(deployment_id: UUID, shas: set[str]) -> list:
    """Flow runs of the quantize deployment whose profile pins one of ``shas``, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return sorted((r for r in runs if r.parameters["profile"]["base"]["revision"] in shas), key=lambda r: r.created)


def seen(repo: str) -> dict | None:
    from prefect.variables import Variable

    return Variable.get(state_variable_name(repo), default=None)


def test_first_sight_triggers_the_exact_revision(hub: HubMirror, quantize_deployment: UUID) -> None:
    sha = _sha()
    hub.set_sha("Qwen/Qwen3.6-27B", sha)
    result = watch_base_releases(_config())

    runs = quantize_runs(quantize_deployment, {sha})
    assert len(runs) == 1, f"expected one quantize run for the new commit, got {len(runs)}"
    profile = runs[0].parameters["profile"]
    assert profile["base"] == {**profile["base"], "repo_id": "Qwen/Qwen3.6-27B", "revision": sha}
    assert profile["name"] == PROFILE and profile["registered_model_name"] is None
    assert runs[0].idempotency_key == f"Qwen/Qwen3.6-27B@{sha}"
    assert runs[0].state.is_scheduled()
    assert result["Qwen/Qwen3.6-27B"]["action"] == "triggered"
    assert result["Qwen/Qwen3.6-27B"]["flow_run_id"] == str(runs[0].id)
    assert seen("Qwen/Qwen3.6-27B") == {"repo": "Qwen/Qwen3.6-27B", "sha": sha, "flow_run_id": str(runs[0].id)}


def test_same_sha_twice_triggers_once_even_when_state_is_lost(hub: HubMirror, quantize_deployment: UUID) -> None:
    sha = _sha()
    hub.set_sha("Qwen/Qwen3.6-27B", sha)
    first = watch_base_releases(_config())
    second = watch_base_releases(_config())
    assert second["Qwen/Qwen3.6-27B"]["action"] == "unchanged"
    assert len(quantize_runs(quantize_deployment, {sha})) == 1

    from prefect.variables import Variable

    Variable.unset(state_variable_name("Qwen/Qwen3.6-27B"))  # the Variable is gone: the idempotency key holds
    third = watch_base_releases(_config())
    assert len(quantize_runs(quantize_deployment, {sha})) == 1, "repo@sha must never start a second quantize run"
    assert third["Qwen/Qwen3.6-27B"]["flow_run_id"] == first["Qwen/Qwen3.6-27B"]["flow_run_id"]


def test_new_sha_triggers_again_with_that_sha(hub: HubMirror, quantize_deployment: UUID) -> None:
    old, new = _sha(), _sha()
    hub.set_sha("Qwen/Qwen3.6-27B", old)
    watch_base_releases(_config())
    hub.set_sha("Qwen/Qwen3.6-27B", new)
    watch_base_releases(_config())

    runs = quantize_runs(quantize_deployment, {old, new})
    assert [r.parameters["profile"]["base"]["revision"] for r in runs] == [old, new]
    assert seen("Qwen/Qwen3.6-27B")["sha"] == new


def test_new_matching_repo_triggers_and_non_matching_does_not(hub: HubMirror, quantize_deployment: UUID) -> None:
    shas = {repo: _sha() for repo in ("Qwen/Qwen3.6-27B", "Qwen/Qwen3.5-9B", "Qwen/Qwen3.6-27B-FP8", "Other/Qwen3.6-1B")}
    for repo, sha in shas.items():
        hub.set_sha(repo, sha)
    watch_base_releases(_config())
    assert [r.parameters["profile"]["base"]["repo_id"] for r in quantize_runs(quantize_deployment, set(shas.values()))] \
        == ["Qwen/Qwen3.6-27B"]

    shas["Qwen/Qwen3.6-32B"] = _sha()
    hub.set_sha("Qwen/Qwen3.6-32B", shas["Qwen/Qwen3.6-32B"])
    result = watch_base_releases(_config())
    assert result["Qwen/Qwen3.6-27B"]["action"] == "unchanged"
    runs = quantize_runs(quantize_deployment, set(shas.values()))
    assert [r.parameters["profile"]["base"]["repo_id"] for r in runs] == ["Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-32B"]
    profile = runs[1].parameters["profile"]
    assert profile["base"]["revision"] == shas["Qwen/Qwen3.6-32B"]
    assert profile["name"] == profile["registered_model_name"] == "qwen3.6-32b-nvfp4"
    assert runs[1].idempotency_key == f"Qwen/Qwen3.6-32B@{shas['Qwen/Qwen3.6-32B']}"
    for repo in ("Qwen/Qwen3.5-9B", "Qwen/Qwen3.6-27B-FP8", "Other/Qwen3.6-1B"):
        assert seen(repo) is None, f"{repo} does not match the watch list and must leave no state"


def test_revision_already_exported_is_skipped(hub: HubMirror, quantize_deployment: UUID, mlflow_server: str) -> None:
    from quantdag.runtime.tracking import Tracker

    sha = _sha()
    hub.set_sha("Qwen/Qwen3.6-27B", sha)
    tracker = Tracker(mlflow_server)
    run_id = tracker.parent(str(uuid.uuid4()), "quantize-earlier", {}, {})
    tracker.register(run_id, PROFILE, "s3://quantdag/artifacts/checkpoint/earlier",
                     {"base_repo": "Qwen/Qwen3.6-27B", "base_revision": "main", "base_revision_sha": sha})

    result = watch_base_releases(_config(EXACT))
    assert quantize_runs(quantize_deployment, {sha}) == [], "a revision already in the registry must not be re-quantized"
    assert result["Qwen/Qwen3.6-27B"]["action"] == "exported"
    assert seen("Qwen/Qwen3.6-27B")["sha"] == sha


def test_failures_are_contained_and_named(hub: HubMirror, quantize_deployment: UUID) -> None:
    shas = {repo: _sha() for repo in ("Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-4B", "Qwen/Qwen3.6-32B")}
    for repo, sha in shas.items():
        hub.set_sha(repo, sha)
    hub.failing |= {"Qwen/Qwen3.6-27B": 500, "Qwen/Qwen3.6-4B": 429}

    state = watch_base_releases(_config(), return_state=True)
    assert state.is_failed(), "a failed repo must fail the watcher run"
    assert "Qwen/Qwen3.6-27B: HTTP 500" in state.message and "Qwen/Qwen3.6-4B: HTTP 429" in state.message, state.message
    runs = quantize_runs(quantize_deployment, set(shas.values()))
    assert [r.parameters["profile"]["base"]["repo_id"] for r in runs] == ["Qwen/Qwen3.6-32B"], (
        "the repo that answered is triggered although others failed")
    assert seen("Qwen/Qwen3.6-27B") is None and seen("Qwen/Qwen3.6-4B") is None


def test_state_is_written_only_after_the_trigger_succeeded(hub: HubMirror, quantize_deployment: UUID) -> None:
    from flows.quantize import quantize

    sha, name = _sha(), f"later-{uuid.uuid4().hex[:8]}"
    hub.set_sha("Qwen/Qwen3.6-27B", sha)
    config = _config({**EXACT, "deployment": f"quantize/{name}"})

    state = watch_base_releases(config, return_state=True)
    assert state.is_failed(), "a missing quantize deployment must fail the watcher run"
    assert f"Qwen/Qwen3.6-27B: HTTP 404: deployment 'quantize/{name}' not found" in state.message, state.message
    assert seen("Qwen/Qwen3.6-27B") is None, "a failed trigger must leave the sha unseen so the next scan retries"

    later = quantize.to_deployment(name=name).apply()
    watch_base_releases(config)
    assert len(quantize_runs(later, {sha})) == 1
    assert seen("Qwen/Qwen3.6-27B")["sha"] == sha


def test_schedule_exists_on_the_deployment_with_the_configured_cron(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client

    config = load_watch()
    watch_deployment(config).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{DEPLOYMENT_NAME}/{DEPLOYMENT_NAME}")
    crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
    assert crons == [(config.cron, config.timezone, True)], crons
    assert WatchConfig.model_validate(deployment.parameters["config"]) == config
    assert deployment.entrypoint == "flows.watch.watch_base_releases"

    changed = config.model_copy(update={"cron": "*/15 * * * *"})
    watch_deployment(changed).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{DEPLOYMENT_NAME}/{DEPLOYMENT_NAME}")
    assert [s.schedule.cron for s in deployment.schedules] == ["*/15 * * * *"], "re-deploying replaces the cron"
