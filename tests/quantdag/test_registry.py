"""The model registry side of a quantize run, against the session's real MLflow server: one version
per checkpoint linked to every run that made it, described, aliased, promoted, marked when gone."""

from __future__ import annotations

import uuid

import pytest
from mlflow.tracking import MlflowClient

from quantdag.runtime import registry
from quantdag.runtime.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker

SOURCE = "s3://quantdag/registry-test/objects/checkpoint/{sha}"


def _sha() -> str:
    return uuid.uuid4().hex * 2


@pytest.fixture()
def tracker(mlflow_server: str) -> Tracker:
    return Tracker(mlflow_server, experiment=f"registry-test-{uuid.uuid4().hex[:8]}")


def _register(tracker: Tracker, name: str, sha: str, **tags: str) -> tuple[str, registry.Version]:
    run_id = tracker.parent(str(uuid.uuid4()), "quantize-test", {}, {})
    tracker.finish(run_id)
    version = registry.register_checkpoint(tracker.client, tracker.experiment_id, run_id, name, SOURCE.format(sha=sha),
                                           {"checkpoint_sha256": sha, "audit": "passed", **tags})
    return run_id, version


def test_experiment_opens_in_the_model_training_view(tracker: Tracker, mlflow_server: str) -> None:
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    name = f"kindless-{uuid.uuid4().hex[:8]}"
    experiment_id = MlflowClient(mlflow_server).create_experiment(name)  # made before the kind was set
    Tracker(mlflow_server, experiment=name)
    assert MlflowClient(mlflow_server).get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_one_version_per_checkpoint_listed_by_every_run_that_made_it(tracker: Tracker) -> None:
    name, sha = f"reg-{uuid.uuid4().hex[:8]}-qwen3.6", _sha()  # a '.' is fine for a registered model, not a logged one
    first_run, first = _register(tracker, name, sha)
    second_run, second = _register(tracker, name, sha)
    assert first.created and not second.created
    assert (first.number, first.model_id) == (second.number, second.model_id), "the same bytes keep their version"
    for run_id in (first_run, second_run):  # what the run page's "Registered models" reads
        outputs = tracker.client.get_run(run_id).outputs.model_outputs
        assert [o.model_id for o in outputs] == [first.model_id], run_id
    versions = tracker.client.get_logged_model(first.model_id).tags["mlflow.modelVersions"]
    assert f'"name": "{name}"' in versions
    _, other = _register(tracker, name, _sha())
    assert other.number != first.number and other.created


def test_evaluations_accumulate_in_the_description_and_tags(tracker: Tracker) -> None:
    name, sha = f"reg-{uuid.uuid4().hex[:8]}", _sha()
    run_id, version = _register(tracker, name, sha)
    links = {"mlflow_run": f"#/experiments/1/runs/{run_id}", "prefect_run": "http://prefect/runs/flow-run/x",
             "eval_report": "#/report"}
    registry.record_evaluation(tracker.client, version, run_id, "a" * 64, {"perplexity_ratio": 1.25, "kl_mean": 0.01,
                                                                          "note": "not a number"}, links)
    registry.record_evaluation(tracker.client, version, run_id, "b" * 64, {"perplexity_ratio": 1.5}, links)
    text = registry.describe(tracker.client, version, {"Recipe": "`nvfp4-max`", "Audit": "passed"})
    assert text.startswith("- **Recipe**: `nvfp4-max`\n- **Audit**: passed\n")
    rows = [line for line in text.splitlines() if line.startswith("| [MLflow]")]
    assert len(rows) == 2 and "1.25" in rows[0] and "1.5" in rows[1], text
    assert "[Prefect](http://prefect/runs/flow-run/x)" in rows[0] and "[eval report](#/report)" in rows[0]
    stored = tracker.client.get_model_version(name, version.number)
    assert stored.description == text
    assert stored.tags["perplexity_ratio"] == "1.5", "the key metrics of the latest evaluation"
    metrics = {m.key: m.value for m in tracker.client.get_logged_model(version.model_id).metrics}
    assert metrics["perplexity_ratio"] == 1.5 and "note" not in metrics


def test_candidate_alias_promotion_and_missing_checkpoints(tracker: Tracker) -> None:
    name = f"reg-{uuid.uuid4().hex[:8]}"
    _, audited = _register(tracker, name, _sha())
    _, unaudited = _register(tracker, name, _sha(), audit="")
    registry.set_candidate(tracker.client, audited)
    assert tracker.client.get_model_version_by_alias(name, registry.CANDIDATE).version == audited.number
    with pytest.raises(ValueError, match="has no passed audit"):
        registry.promote(tracker.client, name, unaudited.number)
    registry.promote(tracker.client, name, audited.number)
    assert tracker.client.get_model_version_by_alias(name, registry.CHAMPION).version == audited.number

    gone = registry.mark_missing(tracker.client, name, lambda version: version.version != audited.number)
    assert gone == [audited.number]
    version = tracker.client.get_model_version(name, audited.number)
    assert version.tags[registry.STATUS_TAG] == "missing" and not version.aliases, "no alias points at missing bytes"
    with pytest.raises(ValueError, match="missing from the store"):
        registry.promote(tracker.client, name, audited.number)
    assert registry.mark_missing(tracker.client, name, lambda version: False) == [unaudited.number], "marked once"
