"""Run names that say what ran, a name given to a run kept, dotted-key overrides, and a run graph
with edges only where data flows; flows run on the session's real Prefect server."""

from __future__ import annotations

import uuid

import pytest

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from conf import load_profile
from conf.schema import BaseModelSpec, Profile
from quantdag.model.loading import BaseRef
from quantdag.runtime.deploy import apply_run_parameters, nest_dotted, with_overrides
from quantdag.runtime.graph import detached
from quantdag.runtime.naming import flow_run_name, is_generated, recipe_tag, run_name, tag_attempts

SHA = "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"


@pytest.fixture(scope="module", autouse=True)
def _send_logs_while_the_server_runs():
    """Send this module's flow-run logs and events now: at exit Prefect would retry a stopped server for a minute."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)


@pytest.fixture()
def profile(tmp_path):
    return load_profile("qwen3.6-27b-nvfp4", {"artifact_store": str(tmp_path / "store"),
                                              "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})


def test_run_name_says_profile_base_revision_and_recipe(profile) -> None:
    assert run_name(profile) == "qwen3.6-27b-nvfp4-Qwen3.6-27B@main-nvfp4-max-kvfp8"
    pinned = apply_run_parameters(profile, SHA)
    assert run_name(pinned) == "qwen3.6-27b-nvfp4-Qwen3.6-27B@1a2b3c4-nvfp4-max-kvfp8", "a sha is cut to 7"
    resolved = BaseRef(source_dir="/models/qwen", repo_id="Qwen/Qwen3.6-27B", revision="main", revision_sha=SHA,
                       fingerprint="f" * 64, is_vlm=True, model_type="qwen3_5")
    assert run_name(profile, resolved) == "qwen3.6-27b-nvfp4-Qwen3.6-27B@1a2b3c4-nvfp4-max-kvfp8"
    no_kv = with_overrides(profile, {"recipe.kv_cache": "none", "recipe.name": "w4a4-mse", "recipe.weight_scale": "mse"})
    assert recipe_tag(no_kv.recipe) == "nvfp4-mse"
    assert run_name(no_kv) != run_name(profile), "another recipe gives another name"
    # a changed setting with the recipe's name left as it was: the tag follows what the recipe does
    mse = with_overrides(profile, {"recipe.weight_scale": "mse"})
    assert mse.recipe.name == "nvfp4-max" and recipe_tag(mse.recipe) == "nvfp4-mse-kvfp8"
    mixed = with_overrides(profile, {"recipe.formats.attention": "fp8", "recipe.formats.linear_attention": "fp8"})
    assert recipe_tag(mixed.recipe) == "mlp-nvfp4-attn-fp8-lin-fp8-max-kvfp8"


def test_generated_names_are_told_from_given_ones() -> None:
    assert is_generated("crimson-lemur") and is_generated("") and is_generated(None)
    for given in ("baseline 2", "demo-eval-2", "Nightly", "my_run", "qwen@abc"):
        assert not is_generated(given), given


def test_overrides_by_dotted_key_and_their_errors(profile) -> None:
    assert nest_dotted({"eval.max_windows": 2, "text.seq_len": 64}) == {"eval": {"max_windows": 2}, "text": {"seq_len": 64}}
    changed = apply_run_parameters(profile, "v2", {"eval.max_windows": 2, "base.revision": "ignored"})
    assert changed.eval.max_windows == 2 and changed.base.revision == "v2", "revision wins over overrides"
    assert changed.text == profile.text
    with pytest.raises(ValueError, match=r"eval.max_windows: Input should be greater than 0"):
        with_overrides(profile, {"eval.max_windows": 0})
    with pytest.raises(ValueError, match=r"eval.max_widows: Extra inputs are not permitted"):
        with_overrides(profile, {"eval.max_widows": 2})
    with pytest.raises(ValueError, match="override key 'eval.'"):
        nest_dotted({"eval.": 2})
    with pytest.raises(ValueError, match="overridden as a whole"):
        nest_dotted({"eval": "x", "eval.seq_len": 64})
    with pytest.raises(ValueError, match="replaces the fields overridden one by one"):
        nest_dotted({"eval.seq_len": 64, "eval": {"max_windows": 2}})
    with pytest.raises(TypeError, match="mapping of dotted keys"):
        with_overrides(profile, ["eval.max_windows=2"])


@flow(flow_run_name=flow_run_name)
def named(profile: Profile, revision: str | None = None, overrides: dict | None = None) -> str:
    """Returns its own run's name."""
    return get_run_context().flow_run.name


@task(cache_policy=NO_CACHE)
def resolve(spec: BaseModelSpec) -> BaseRef:
    """Like the resolve step: its result holds strings of the profile (``revision: main``)."""
    return BaseRef(source_dir="/m", repo_id=spec.repo_id, revision=spec.revision, revision_sha=SHA,
                   fingerprint="f" * 64, is_vlm=False, model_type="llama")


@task(cache_policy=NO_CACHE)
def consume(value: object) -> int:
    return 1


@flow
def shaped(profile: Profile) -> str:
    """The start of the quantize flow: resolve, then steps that take the base or the profile's sections."""
    resolved = resolve.submit(profile.base)
    base = detached(resolved.result())
    consume.submit(profile.text).result()  # holds the same "main" as the resolved base
    consume.submit(base, wait_for=[resolved]).result()
    consume.submit(base).result()
    return str(get_run_context().flow_run.id)


@flow(retries=1)
@tag_attempts
def flaky(marker: str) -> str:
    """Fails its first attempt after one task run; the retry runs the task again."""
    consume.submit(marker).result()
    if get_run_context().flow_run.run_count == 1:
        raise RuntimeError("first attempt fails")
    return str(get_run_context().flow_run.id)


def test_task_runs_of_a_retried_flow_run_are_tagged_with_their_attempt(prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flaky(uuid.uuid4().hex)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert sorted((run.flow_run_run_count, tuple(run.tags)) for run in runs) == [(1, ()), (2, ("attempt-2",))]


def test_flow_run_name_keeps_a_given_name_and_replaces_a_generated_one(prefect_api: str, profile) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    parameters = {"profile": profile, "revision": SHA, "overrides": {"eval.max_windows": 2}}
    assert named(**parameters) == "qwen3.6-27b-nvfp4-Qwen3.6-27B@1a2b3c4-nvfp4-max-kvfp8"
    given = f"baseline {uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(named, name=given, parameters=parameters)
    assert run_flow(named, flow_run=run, parameters=parameters) == given, "a name given to the run is kept"


def test_run_graph_has_edges_only_where_data_flows(prefect_api: str, profile) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = shaped(profile)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.id: run.name for run in runs}
    upstream = {run.name: {names[i.id].rsplit("-", 1)[0] for v in run.task_inputs.values() for i in v if hasattr(i, "id")}
                for run in runs}
    consumers = sorted((name for name in upstream if name.startswith("consume")), key=lambda n: n)
    assert len(consumers) == 3
    assert sorted(len(upstream[name]) for name in consumers) == [0, 0, 1], (
        f"only the consumer that waits for resolve has an edge from it: {upstream}")
