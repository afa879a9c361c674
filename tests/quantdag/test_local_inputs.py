from __future__ import annotations

from pathlib import Path

import pytest

from conf import load_profile
from quantdag.runtime.preflight import PreflightError, missing_local_inputs, preflight


def test_missing_local_inputs_are_named_by_field(tmp_path: Path) -> None:
    profile = load_profile("demo", {"base": {"local_dir": str(tmp_path / "no-model")},
                                    "text": {"path": str(tmp_path / "no-rows.jsonl")},
                                    "eval": {"path": str(tmp_path / "no-eval.txt")},
                                    "image_text": {"path": str(tmp_path / "no-mirror")},
                                    "artifact_store": str(tmp_path / "store"),
                                    "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    problems = missing_local_inputs(profile)
    for field in ("base.local_dir", "text.path", "eval.path", "image_text.path"):
        assert any(line.startswith(f"{field} ") for line in problems), f"{field} not reported: {problems}"
    with pytest.raises(PreflightError, match="quantdag fetch-smollm2"):
        preflight(profile)


def test_existing_and_remote_inputs_pass(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("{}\n")
    profile = load_profile("smollm2-nvfp4", {"base": {"local_dir": str(tmp_path)},
                                             "text": {"path": str(tmp_path / "rows.jsonl")},
                                             "eval": {"path": "s3://bucket/eval.txt"}})
    assert missing_local_inputs(profile) == []


def test_calibration_gpus_beyond_visible_gpus_is_refused(tmp_path: Path) -> None:
    from quantdag.runtime.preflight import gpu_shortfall

    profile = load_profile("demo", {"calibration_gpus": 2, "device": "cuda"})
    problems = gpu_shortfall(profile, {"CUDA_VISIBLE_DEVICES": "0"})
    assert len(problems) == 1 and "calibration_gpus 2" in problems[0] and "CUDA_VISIBLE_DEVICES=0" in problems[0]
    assert gpu_shortfall(profile, {"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    assert gpu_shortfall(profile.model_copy(update={"calibration_gpus": 1}), {}) == []
    auto = profile.model_copy(update={"device": "auto"})
    import torch

    assert bool(gpu_shortfall(auto, {})) == torch.cuda.is_available(), "device auto on a CPU-only host needs no GPUs"
    with pytest.raises(ValueError, match="calibration_gpus"):
        load_profile("demo", {"calibration_gpus": 0})
