"""The watch step's plain functions: watch-list validation, Hub scan against a local mirror,
naming, token lookup, and the registry check against a real MLflow server."""

from __future__ import annotations

import pickle
import re
import secrets
import uuid
from pathlib import Path

import pytest
from hub_mirror import HubMirror, serve_mirror
from mlflow.tracking import MlflowClient

from conf import load_profile
from conf.watch import PatternEntry, RepoEntry, WatchConfig, load_watch
from tasks.watch.hub_scan import Candidate, WatchError, WatchFailure, failure_from, hub_api, hub_token, scan_hub
from tasks.watch.hub_watch import already_exported, derived_name, run_profile, state_variable_name

PROFILE = "qwen3.6-27b-nvfp4"


def _sha() -> str:
    return secrets.token_hex(20)


def _config(*entries: dict, **extra: object) -> WatchConfig:
    return WatchConfig.model_validate({"cron": "0 */6 * * *", "entries": list(entries), **extra})


EXACT = {"repo": "Qwen/Qwen3.6-27B", "branch": "main", "profile": PROFILE}
PATTERN = {"author": "Qwen", "name_glob": "Qwen3.6-*", "exclude": ["*-FP8*", "*-GGUF"], "profile": PROFILE}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with serve_mirror(monkeypatch) as mirror:
        yield mirror


# --- the watch list -------------------------------------------------------------------------------

def test_shipped_watch_list_loads_with_both_entry_kinds() -> None:
    config = load_watch()
    kinds = {type(e) for e in config.entries}
    assert kinds == {RepoEntry, PatternEntry}, f"conf/watch.yaml should have an exact repo and a pattern: {kinds}"
    assert all(e.deployment_name == "quantize/qwen3-6-27b-nvfp4" for e in config.entries)
    again = WatchConfig.model_validate_json(config.model_dump_json())
    assert again == config, "the watch list must survive the JSON round trip a deployment parameter makes"
    for entry in config.entries:
        load_profile(entry.profile)  # every referenced profile exists and validates


@pytest.mark.parametrize(("data", "field"), [
    ({"cron": "every day", "entries": [EXACT]}, "cron"),
    ({"cron": "0 * * * *", "timezone": "Mars/Olympus", "entries": [EXACT]}, "timezone"),
    ({"cron": "0 * * * *", "entries": []}, "entries"),
    ({"cron": "0 * * * *", "entries": [{**EXACT, "author": "Qwen"}]}, "entries.0"),
    ({"cron": "0 * * * *", "entries": [{**PATTERN, "name_glob": "Qwen/Qwen3.6-*"}]}, "entries.0.pattern.name_glob"),
    ({"cron": "0 * * * *", "entries": [{**EXACT, "repo": "no-slash"}]}, "entries.0.repo.repo"),
    ({"cron": "0 * * * *", "entries": [{**EXACT, "deployment": "just-a-name"}]}, "entries.0.repo.deployment"),
    ({"cron": "0 * * * *", "entries": [EXACT, EXACT]}, "entries"),
    ({"cron": "0 * * * *", "entries": [{**EXACT, "brnch": "dev"}]}, "entries.0.repo.brnch"),
])
def test_bad_watch_list_names_the_field(tmp_path: Path, data: dict, field: str) -> None:
    import yaml

    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=rf"(?m)^\s+{re.escape(field)}:"):
        load_watch(path)


def test_pattern_search_is_the_literal_prefix_and_deployment_follows_profile() -> None:
    entry = PatternEntry.model_validate({**PATTERN, "name_glob": "Qwen3.6-*B-Instruct"})
    assert entry.search == "Qwen3.6-"
    assert entry.deployment_name == "quantize/qwen3-6-27b-nvfp4"
    assert RepoEntry.model_validate({**EXACT, "deployment": "quantize/custom"}).deployment_name == "quantize/custom"


# --- the Hub scan against the mirror --------------------------------------------------------------

def test_scan_finds_exact_and_matching_repos_only(hub: HubMirror) -> None:
    shas = {repo: _sha() for repo in ("Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-32B", "Qwen/Qwen3.6-27B-FP8",
                                      "Qwen/Qwen3.5-9B", "Qwen/Qwen3.6", "Other/Qwen3.6-1B", "Qwen/qwen3.6-7b")}
    for repo, sha in shas.items():
        hub.set_sha(repo, sha)
    scan = scan_hub(_config(PATTERN, EXACT), hub_api(None))
    assert scan.failures == ()
    found = {c.repo: c for c in scan.candidates}
    assert set(found) == {"Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-32B"}, (
        "the glob is case-sensitive, excludes apply, other authors and Qwen3.5 never match")
    assert all(c.sha == shas[c.repo] for c in scan.candidates)
    assert found["Qwen/Qwen3.6-27B"].source == "Qwen/Qwen3.6-27B", "an exact entry wins over a pattern"
    assert found["Qwen/Qwen3.6-32B"].source == "Qwen/Qwen3.6-*"
    infos = [r["path"] for r in hub.requests if r["path"] != "/api/models"]
    assert sorted(infos) == ["/api/models/Qwen/Qwen3.6-27B/revision/main", "/api/models/Qwen/Qwen3.6-32B/revision/main"], (
        "each candidate is resolved once, on its branch")


def test_scan_tracks_the_configured_branch(hub: HubMirror) -> None:
    main_sha, dev_sha = _sha(), _sha()
    hub.set_sha("Qwen/Qwen3.6-27B", main_sha)
    hub.set_sha("Qwen/Qwen3.6-27B", dev_sha, branch="dev")
    scan = scan_hub(_config({**EXACT, "branch": "dev"}), hub_api(None))
    assert [(c.repo, c.sha, c.branch) for c in scan.candidates] == [("Qwen/Qwen3.6-27B", dev_sha, "dev")]


def test_scan_contains_failures_and_names_repo_and_status(hub: HubMirror) -> None:
    for repo in ("Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-32B", "Qwen/Qwen3.6-4B", "Qwen/Qwen3.6-8B"):
        hub.set_sha(repo, _sha())
    hub.failing |= {"Qwen/Qwen3.6-27B": 500, "Qwen/Qwen3.6-4B": 429}
    missing = {"repo": "Qwen/Qwen3.6-999B", "profile": PROFILE}
    scan = scan_hub(_config(EXACT, missing, PATTERN), hub_api(None))
    assert {c.repo for c in scan.candidates} == {"Qwen/Qwen3.6-32B", "Qwen/Qwen3.6-8B"}
    statuses = {f.repo: f.status for f in scan.failures}
    assert statuses == {"Qwen/Qwen3.6-27B": 500, "Qwen/Qwen3.6-999B": 404, "Qwen/Qwen3.6-4B": 429}, scan.failures
    assert "Qwen/Qwen3.6-4B: HTTP 429" in str(next(f for f in scan.failures if f.status == 429))


def test_failing_listing_fails_only_its_pattern(hub: HubMirror) -> None:
    sha = _sha()
    hub.set_sha("Qwen/Qwen3.6-27B", sha)
    hub.set_sha("Other/Thing-1B", _sha())
    hub.failing["Other"] = 503
    other = {"author": "Other", "name_glob": "Thing-*", "profile": PROFILE}
    scan = scan_hub(_config(EXACT, other), hub_api(None))
    assert [(c.repo, c.sha) for c in scan.candidates] == [("Qwen/Qwen3.6-27B", sha)]
    assert [(f.repo, f.status) for f in scan.failures] == [("Other/Thing-*", 503)]


def test_unreachable_endpoint_is_a_failure_without_status(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_mirror(monkeypatch) as mirror:
        url = mirror.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # stopped: connection refused
    scan = scan_hub(_config(EXACT), hub_api(None))
    assert scan.candidates == ()
    assert [(f.repo, f.status) for f in scan.failures] == [("Qwen/Qwen3.6-27B", None)]
    assert "unreachable" in scan.failures[0].detail


def test_offline_mode_refuses_to_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        hub_api(None)


def test_watch_error_survives_pickling_with_its_failure() -> None:
    failure = WatchFailure(repo="Qwen/Qwen3.6-27B", status=429, detail="rate limited")
    again = pickle.loads(pickle.dumps(WatchError(failure)))
    assert again.failure == failure and str(again) == "Qwen/Qwen3.6-27B: HTTP 429: rate limited"
    assert failure_from("x/y", again) == failure


# --- names ----------------------------------------------------------------------------------------

def test_names_are_slugs() -> None:
    assert state_variable_name("Qwen/Qwen3.6-27B") == "hub-sha-qwen-qwen3-6-27b"
    assert derived_name("Qwen/Qwen3.6-32B", "nvfp4") == "qwen3.6-32b-nvfp4"
    assert derived_name("Org/My_Model.v2", "nvfp4") == "my-model.v2-nvfp4"


def _candidate(repo: str, sha: str) -> Candidate:
    return Candidate(repo=repo, sha=sha, branch="main", profile=PROFILE, deployment="quantize/qwen3-6-27b-nvfp4",
                     name_suffix="nvfp4", source=repo)


def test_run_profile_pins_the_sha_and_names_other_repos_after_themselves() -> None:
    sha = _sha()
    own = run_profile(_candidate("Qwen/Qwen3.6-27B", sha))
    assert (own.base.repo_id, own.base.revision) == ("Qwen/Qwen3.6-27B", sha)
    assert own.name == PROFILE and own.model_name == PROFILE, "the profile's own repo keeps its names"
    other = run_profile(_candidate("Qwen/Qwen3.6-32B", sha))
    assert (other.base.repo_id, other.base.revision) == ("Qwen/Qwen3.6-32B", sha)
    assert other.name == other.model_name == "qwen3.6-32b-nvfp4", "another size must not share the registry entry"
    assert other.recipe == own.recipe


# --- the token ------------------------------------------------------------------------------------

def test_token_comes_from_secret_block_then_environment(prefect_api: str, hub: HubMirror,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.system import Secret

    block = f"hf-token-{uuid.uuid4().hex[:8]}"
    Secret(value="hf_from_block").save(block)
    assert hub_token(block) == "hf_from_block"
    assert hub_token("hf-token-absent") is None
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert hub_token("hf-token-absent") == "hf_from_env"
    assert hub_token(block) == "hf_from_block", "the Secret block wins over the environment"

    hub.set_sha("Qwen/Qwen3.6-27B", _sha())
    scan_hub(_config(EXACT), hub_api(hub_token(block)))
    assert hub.requests[-1]["authorization"] == "Bearer hf_from_block"


# --- the registry check (and the lineage it relies on) --------------------------------------------

def test_registered_version_carries_the_base_sha_and_counts_as_exported(mlflow_server: str, s3_endpoint: str,
                                                                         tmp_path: Path) -> None:
    from quantdag.runtime.lineage import Lineage
    from quantdag.model.loading import BaseRef
    from quantdag.runtime.store import ArtifactRef, ArtifactStore

    sha, model = _sha(), f"watch-test-{uuid.uuid4().hex[:8]}-nvfp4"
    store = ArtifactStore(f"s3://quantdag/hub-watch-{uuid.uuid4().hex[:8]}")
    profile = load_profile(PROFILE, {"tracking_uri": mlflow_server, "registered_model_name": model,
                                     "base": {"revision": "main"}, "artifact_store": store.root})
    base = BaseRef(source_dir="/models/qwen", repo_id="Qwen/Qwen3.6-27B", revision="main", revision_sha=sha,
                   fingerprint=sha, is_vlm=True, model_type="qwen3_5")
    assert not already_exported(mlflow_server, model, "Qwen/Qwen3.6-27B", sha), "no model yet: nothing exported"

    lineage = Lineage(profile, base, str(uuid.uuid4()), "test")
    files = tmp_path / "checkpoint"
    files.mkdir()
    (files / "config.json").write_text("{}")
    checkpoint = store.put_dir(files, "checkpoint", {})
    audit = ArtifactRef(uri=f"{store.root}/objects/audit-report/x", sha256="1" * 64, kind="audit-report", files={},
                        meta={"passed": True, "checkpoint_sha256": checkpoint.sha256})
    number = lineage.register(checkpoint, audit)  # only an audited checkpoint is registered

    version = MlflowClient(tracking_uri=mlflow_server).get_model_version(model, number)
    assert version.tags["base_revision_sha"] == sha, "the version must name the commit actually loaded"
    assert version.tags["base_revision"] == "main" and version.tags["base_repo"] == "Qwen/Qwen3.6-27B"
    assert already_exported(mlflow_server, model, "Qwen/Qwen3.6-27B", sha)
    assert not already_exported(mlflow_server, model, "Qwen/Qwen3.6-27B", _sha()), "another commit is not exported"
    assert not already_exported(mlflow_server, model, "Qwen/Qwen3.6-32B", sha), "the sha must come from the same repo"
