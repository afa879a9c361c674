"""The whole demo flow against a real Prefect server, a real MLflow server and S3 (moto).

One module-scoped first run, then a rerun (every step Cached) and a run with changed eval
settings (only ``evaluate`` recomputes).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conf import load_profile
from quantdag.runtime.store import ArtifactRef, ArtifactStore

pytestmark = pytest.mark.slow

STEPS = {"fetch_text", "fetch_image_text", "fetch_image_text_heldout", "bf16_reference", "calibrate_text", "calibrate_image_text", "merge_amax", "export", "audit",
         "evaluate"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantdag.demo.workspace import build_demo_workspace

    return build_demo_workspace(tmp_path_factory.mktemp("demo-home") / "demo")


@pytest.fixture(scope="module")
def profile(demo_root: Path, prefect_api: str, mlflow_server: str, s3_endpoint: str):
    return load_profile("demo", {
        "name": "demo-flow-test",
        "base": {"local_dir": str(demo_root / "model")},
        "image_text": {"path": str(demo_root / "nemotron-vlm-mirror")},
        "text": {"path": str(demo_root / "cnn_dailymail" / "train.jsonl")},
        "eval": {"path": str(demo_root / "heldout.txt"), "max_windows": 2},
        "artifact_store": f"s3://quantdag/flow-test-{uuid.uuid4().hex[:8]}",
        "tracking_uri": mlflow_server,
        "device": "cpu",
    })


@pytest.fixture(scope="module")
def first_run(profile):
    from flows.quantize import quantize

    return quantize(profile)


def _tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in export_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def test_first_run_computes_every_step(first_run) -> None:
    assert set(first_run["cached"]) == STEPS
    assert not any(first_run["cached"].values()), f"a fresh store must compute every step: {first_run['cached']}"


def test_export_meets_the_nvfp4_format(first_run, profile, demo_root: Path) -> None:
    checkpoint = ArtifactRef.model_validate(first_run["checkpoint"])
    export_dir = ArtifactStore(profile.artifact_store).local_dir(checkpoint)
    quant = json.loads((export_dir / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["kv_cache_quant_algo"] == "FP8" and quant["group_size"] == 16
    config = json.loads((export_dir / "config.json").read_text())
    assert "quantization_config" in config
    tensors = _tensors(export_dir)
    scaled = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
    assert scaled, "no quantized linear in the export"
    for module in scaled:
        weight, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
        assert weight.dtype == torch.uint8 and scale.dtype == torch.float8_e4m3fn, module
        out_features, packed = weight.shape
        assert scale.shape == (out_features, packed * 2 // 16), f"{module}: block scale shape {tuple(scale.shape)}"
        for name in ("weight_scale_2", "input_scale"):
            value = tensors[f"{module}.{name}"]
            assert value.dtype == torch.float32 and value.numel() == 1 and float(value) > 0, f"{module}.{name}"
    assert any(".linear_attn.in_proj_qkv" in m for m in scaled), "linear-attention projections must be NVFP4"
    assert any(".self_attn.q_proj" in m for m in scaled) and any(".mlp.down_proj" in m for m in scaled)
    for prefix in ("model.visual.", "lm_head", "mtp.", "model.language_model.embed_tokens"):
        keys = [k for k in tensors if k.startswith(prefix)]
        assert keys, f"{prefix} tensors missing from the export"
        assert not any(k.endswith(("_scale", "_scale_2")) for k in keys), f"{prefix} must stay unquantized"
        assert all(tensors[k].dtype == torch.bfloat16 for k in keys if k.endswith(".weight")), prefix
    for module in ("conv1d", "in_proj_a", "in_proj_b"):
        assert not any(f"linear_attn.{module}" in m for m in scaled), f"{module} must stay BF16"
    base = _tensors(demo_root / "model")
    mtp = {k: v for k, v in base.items() if k.startswith("mtp.")}
    assert mtp and all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in mtp.items())
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (export_dir / name).is_file(), f"{name} not saved with the export"


def test_image_pass_ran_the_vision_tower(first_run, profile) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(profile.tracking_uri)
    children = client.search_runs(
        [client.get_experiment_by_name("quantdag").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first_run['mlflow_run_id']}'",
    )
    by_step = {run.data.tags["quantdag.step"]: run for run in children}
    assert set(by_step) == STEPS, f"one child run per step expected, got {sorted(by_step)}"
    image = by_step["calibrate_image_text"].data.metrics
    assert image["vision_forward_calls"] >= 6 and image["image_tokens"] > 0
    assert image["vision_embeddings"] == image["image_tokens"]
    loads = {step: by_step[step].data.metrics["model_loads"]
             for step in ("bf16_reference", "calibrate_image_text", "calibrate_text", "export", "evaluate")}
    assert loads == {"bf16_reference": 1, "calibrate_image_text": 0, "calibrate_text": 0, "export": 0, "evaluate": 1}, (
        f"one load of the base (reference, both calibration branches, export) plus one read of the export: {loads}")
    evaluation = by_step["evaluate"].data.metrics
    assert evaluation["perplexity_nvfp4"] > 0 and 0 <= evaluation["top1_agreement"] <= 1
    assert evaluation["image_text_rows"] == 3 and evaluation["image_text_eval_tokens"] > 0
    assert evaluation["image_text_kl_mean"] > 0, "NVFP4 answer-token logits must differ from BF16"
    parent = client.get_run(first_run["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["model_loads"] == 2, f"{parent.data.metrics.get('model_loads')} model loads in the run"
    for step in ("bf16_reference", "calibrate_image_text", "export", "evaluate"):
        assert by_step[step].data.metrics["peak_rss_bytes"] > 0 and "peak_gpu_bytes" in by_step[step].data.metrics, step
    assert parent.data.tags["base.fingerprint"] and parent.data.params["recipe.kv_cache"] == "fp8_cast"
    version = client.get_model_version(profile.model_name, first_run["model_version"])
    assert version.tags["checkpoint_sha256"] == first_run["checkpoint"]["sha256"]
    inputs = by_step["fetch_image_text"].inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest


def test_identical_rerun_is_all_cached(first_run, profile) -> None:
    from flows.quantize import quantize

    again = quantize(profile)
    assert all(again["cached"].values()), f"steps recomputed on an identical rerun: {again['cached']}"
    assert again["checkpoint"]["sha256"] == first_run["checkpoint"]["sha256"]


def test_changing_eval_settings_reruns_only_reference_and_evaluate(first_run, profile) -> None:
    from flows.quantize import quantize

    changed = profile.model_copy(update={"eval": profile.eval.model_copy(update={"seq_len": 64})})
    result = quantize(changed)
    recomputed = {step for step, hit in result["cached"].items() if not hit}
    assert recomputed == {"bf16_reference", "evaluate"}, (
        f"expected only the BF16 reference and evaluate (both depend on the eval spec) to recompute, got {sorted(recomputed)}")


def test_calibration_in_worker_processes_gives_the_same_checkpoint(first_run, profile) -> None:
    """``calibration_gpus: 2`` (here on the CPU): each branch and shard is a task of a pool of two
    worker processes; merged by max, the export is the same bytes as the one-load run's."""
    from flows.quantize import quantize

    pooled = profile.model_copy(update={"calibration_gpus": 2, "text": profile.text.model_copy(update={"shards": 2})})
    result = quantize(pooled)
    calibrations = {"calibrate_image_text", "calibrate_text[0]", "calibrate_text[1]"}
    assert calibrations <= set(result["cached"]), f"calibration steps: {sorted(result['cached'])}"
    assert not any(result["cached"][step] for step in calibrations), result["cached"]
    assert result["checkpoint"]["sha256"] == first_run["checkpoint"]["sha256"]


def test_a_base_with_nan_weights_fails_naming_the_tensor_before_any_model_loads(profile, demo_root: Path,
                                                                               tmp_path: Path) -> None:
    """A NaN in one weight of the base: the run fails in ``scan_base`` with the tensor's name,
    before the BF16 reference (or anything else) loads a model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from flows.quantize import quantize
    from quantdag.model.loading import model_loads

    damaged = tmp_path / "model"
    shutil.copytree(demo_root / "model", damaged)
    file = damaged / "model.safetensors"
    tensors = load_file(str(file))
    name = next(key for key in sorted(tensors) if key.endswith("mlp.down_proj.weight"))
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})
    loads = model_loads()
    with pytest.raises(ValueError, match=f"hold NaN or infinite values: {name.replace('.', '[.]')}"):
        quantize(profile.model_copy(update={"base": profile.base.model_copy(update={"local_dir": str(damaged)})}))
    assert model_loads() == loads, "a model was loaded before the NaN weight was reported"
