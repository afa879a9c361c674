"""The compare flow on the demo against a real Prefect server, a real MLflow server and S3 (moto).

Three recipes, one calibration: the reference recipe (exports straight from the calibration), a
mixed recipe with local-Hessian weight scales (NVFP4 MLP, FP8 attention: hessian and
weight_scales steps) and a weight-only one with MSE weight scales (weight_scales only).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from conf import load_profile
from conf.recipe import GroupFormats, RecipeSpec
from quantdag.runtime.store import ArtifactRef, ArtifactStore

pytestmark = pytest.mark.slow

RECIPES = [
    RecipeSpec(),
    RecipeSpec(name="lh-fp8-attention", weight_scale="local_hessian",
               formats=GroupFormats(attention="fp8", linear_attention="fp8")),
    RecipeSpec(name="w4a16-mse", weight_scale="mse",
               formats=GroupFormats(mlp="nvfp4_w4a16", attention="nvfp4_w4a16", linear_attention="nvfp4_w4a16")),
]
REFERENCE_DEMO_CHECKPOINT = "b76cccfeeca2d53c0520a776f4ae353a13135a29a4a8c8f0042601c912b156b3"
"""sha256 of the demo checkpoint that the reference recipe exported before recipes became data."""


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantdag.demo.workspace import build_demo_workspace

    return build_demo_workspace(tmp_path_factory.mktemp("compare-home") / "demo")


@pytest.fixture(scope="module")
def profile(demo_root: Path, prefect_api: str, mlflow_server: str, s3_endpoint: str):
    return load_profile("demo", {
        "name": "demo-compare-test",
        "base": {"local_dir": str(demo_root / "model")},
        "image_text": {"path": str(demo_root / "nemotron-vlm-mirror")},
        "text": {"path": str(demo_root / "cnn_dailymail" / "train.jsonl")},
        "eval": {"path": str(demo_root / "heldout.txt"), "max_windows": 2, "image_text_samples": 0},
        "artifact_store": f"s3://quantdag/compare-test-{uuid.uuid4().hex[:8]}",
        "tracking_uri": mlflow_server,
        "device": "cpu",
    })


@pytest.fixture(scope="module")
def compared(profile):
    from flows.compare import compare

    return compare(profile, RECIPES)


def test_one_calibration_serves_every_recipe(compared) -> None:
    cached = compared["cached"]
    first, *others = [r.name for r in RECIPES]
    calibrations = {name: {step: hit for step, hit in cached.items() if step.startswith(f"{name}/calibrate_")}
                    for name in (first, *others)}
    assert calibrations[first] and not any(calibrations[first].values()), f"the first recipe calibrates: {cached}"
    for name in others:
        assert calibrations[name] and all(calibrations[name].values()), f"{name}'s calibration must be Cached: {cached}"
        assert cached[f"{name}/merge_amax"], f"{name}'s merge must be Cached: {cached}"
    assert cached["bf16_reference"] is False and "fetch_text" in cached
    steps = {name: {step.split("/", 1)[1] for step in cached if step.startswith(f"{name}/")} for name in (first, *others)}
    assert "weight_scales" not in steps[first] and "hessian" not in steps[first]
    assert {"hessian", "weight_scales"} <= steps["lh-fp8-attention"]
    assert "weight_scales" in steps["w4a16-mse"] and "hessian" not in steps["w4a16-mse"]
    assert not any(hit for step, hit in cached.items() if step.split("/")[-1] in ("hessian", "weight_scales", "export"))


def test_reference_recipe_exports_the_same_bytes_as_before(compared) -> None:
    assert compared["checkpoints"][RECIPES[0].name]["sha256"] == REFERENCE_DEMO_CHECKPOINT, (
        "the reference recipe's demo checkpoint changed: its bytes must not depend on recipes being data")


def test_each_recipe_exports_and_audits_its_formats(compared, profile) -> None:
    store = ArtifactStore(profile.artifact_store)
    quant = {name: json.loads((store.local_dir(ArtifactRef.model_validate(ref)) / "hf_quant_config.json").read_text())
             ["quantization"] for name, ref in compared["checkpoints"].items()}
    mixed = quant["lh-fp8-attention"]
    assert mixed["quant_algo"] == "MIXED_PRECISION" and "model.visual*" in mixed["exclude_modules"]
    layers = mixed["quantized_layers"]
    assert layers["model.language_model.layers.3.self_attn.q_proj"] == {"quant_algo": "FP8"}
    assert layers["model.language_model.layers.0.linear_attn.in_proj_qkv"] == {"quant_algo": "FP8"}
    assert layers["model.language_model.layers.0.mlp.down_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert quant["w4a16-mse"]["quant_algo"] == "W4A16_NVFP4" and quant[RECIPES[0].name]["quant_algo"] == "NVFP4"
    rows = {row["recipe"]: row for row in compared["rows"]}
    assert set(rows) == {r.name for r in RECIPES}
    assert rows["lh-fp8-attention"]["checkpoint_bytes"] > rows[RECIPES[0].name]["checkpoint_bytes"], (
        "FP8 attention (1 byte a weight) must be larger than NVFP4 (0.56)")
    assert all(row["perplexity"] > 0 and 0 <= row["top1_agreement"] <= 1 for row in rows.values())


def test_mlflow_has_a_child_per_recipe_and_the_table_and_plot(compared, profile) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    client = MlflowClient(profile.tracking_uri)
    experiment = client.get_experiment_by_name("quantdag").experiment_id
    parent = client.get_run(compared["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"compare-{profile.name}"
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    recipes = {run.info.run_name: run for run in children if run.data.tags.get("quantdag.role") == "recipe"}
    assert set(recipes) == {r.name for r in RECIPES}
    for name, run in recipes.items():
        assert {"delta_perplexity_pct", "kl_mean", "top1_agreement", "bits_per_parameter", "checkpoint_bytes",
                "seconds"} <= set(run.data.metrics), name
        assert run.data.params["recipe.name"] == name
        steps = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert {"export", "audit", "evaluate"} <= {s.data.tags["quantdag.step"] for s in steps}, name
    assert {"comparison.md", "comparison.json", "quality_vs_size.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    key = f"compare-{profile.name}".replace(".", "-")
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=1)
    assert all(r.name in artifact.data for r in RECIPES) and "Δppl vs BF16" in artifact.data
