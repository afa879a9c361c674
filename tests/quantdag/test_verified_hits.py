"""A cached step whose artifact was damaged in the store recomputes (and repairs it) instead of hitting."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest
from prefect import flow

from quantdag.runtime.prefect_task import artifact_refs, damaged_results, quantdag_task
from quantdag.runtime.store import ArtifactRef, ArtifactStore

CONFIG = '{"exclude_modules": ["lm_head", "model.visual*"]}'


@quantdag_task("write_config")
def write_config_task(root: str, payload: str, code_version: str) -> dict[str, ArtifactRef]:
    """A step that stores one small artifact (returned inside a dict, as calibration does)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(payload)
        return {"state": ArtifactStore(root).put_dir(tmp, "checkpoint")}


@flow(name="verified-hits")
def write_config_flow(root: str, payload: str, code_version: str) -> tuple[dict[str, ArtifactRef], str]:
    future = write_config_task.submit(root, payload, code_version)
    return future.result(), future.state.name


def test_cached_result_with_damaged_artifact_recomputes_and_repairs(tmp_path: Path, prefect_api: str, request) -> None:
    from fault_rows import fault_row

    row = fault_row(request, "cached step's artifact edited in the store",
                    "the hit is refused, the step recomputes and rewrites the artifact; the next run hits again")
    root, version = str(tmp_path / "store"), uuid.uuid4().hex  # a version of its own: no earlier session's records
    first, state = write_config_flow(root, CONFIG, version)
    assert state == "Completed"
    assert write_config_flow(root, CONFIG, version)[1] == "Cached"
    config = Path(first["state"].uri) / "config.json"
    config.write_text(CONFIG.replace('"lm_head", ', "").ljust(len(CONFIG)))  # same size, other bytes

    again, state = write_config_flow(root, CONFIG, version)
    assert state == "Completed", "a damaged artifact was served as a cache hit"
    assert again == first and config.read_text() == CONFIG, "recomputing must replace the damaged copy"
    ArtifactStore(root).verify(again["state"])
    assert write_config_flow(root, CONFIG, version)[1] == "Cached", "after the repair the original key hits again"

    ArtifactStore(root).unpublish(first["state"])  # deleted (manifest gone): also recomputed
    assert write_config_flow(root, CONFIG, version)[1] == "Completed"
    row.observed("damaged: Completed (recomputed, config.json restored); next run Cached; deleted: Completed")


def test_damaged_results_names_each_damaged_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text("{}")
    ref = store.put_dir(src, "text-rows")
    value = {"x": [ref, ("y", ref)], "n": 3}
    assert artifact_refs(value) == [ref, ref]
    assert damaged_results(value) == {}
    (Path(ref.uri) / "a.json").write_text("[]")
    assert list(damaged_results(value)) == [ref.sha256]
    assert "a.json was rewritten" in damaged_results(value)[ref.sha256]
    foreign = ref.model_copy(update={"uri": str(tmp_path / "not-a-store")})
    assert "not an object of a quantdag store" in damaged_results(foreign)[ref.sha256]


@pytest.fixture(autouse=True)
def _no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTDAG_TASK_RETRIES", "0")
