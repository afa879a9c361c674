"""A base with NaN or infinite weights is refused by tensor name, from its files, before any model loads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fault_rows import fault_row
from quantdag.format.scan import find_nonfinite_weights, has_nonfinite, nonfinite_tensors, require_finite
from quantdag.model.loading import BaseRef
from tasks.scan import scan_base


def _sharded_base(root: Path) -> Path:
    """Two shards: a NaN in layer 1's down_proj (shard 2), an inf in layer 0's q_proj (shard 1)."""
    root.mkdir(parents=True, exist_ok=True)
    good = torch.randn(64, 32, dtype=torch.bfloat16)
    q_proj = good.clone()
    q_proj[3, 4] = float("inf")
    down = torch.randn(32, 64, dtype=torch.float32)
    down[-1, -1] = float("nan")
    shard1 = {"model.layers.0.self_attn.q_proj.weight": q_proj, "model.layers.0.mlp.up_proj.weight": good,
              "model.embed_tokens.weight": torch.randn(100, 32, dtype=torch.bfloat16)}
    shard2 = {"model.layers.1.mlp.down_proj.weight": down, "model.layers.1.ids": torch.arange(8, dtype=torch.int64),
              "model.layers.1.scale": torch.tensor([1.0], dtype=torch.float8_e4m3fn)}
    save_file(shard1, str(root / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(root / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(shard1, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(shard2, "model-00002-of-00002.safetensors")}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def test_nonfinite_tensors_are_named_from_the_files(tmp_path: Path, request) -> None:
    row = fault_row(request, "base with NaN/inf weights",
                    "the scan of the base's files names each tensor before calibration (no model load)")
    base = _sharded_base(tmp_path / "base")
    start = time.monotonic()
    assert nonfinite_tensors(base) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError) as caught:
        require_finite(base, "base demo")
    message = str(caught.value)
    assert message.startswith("base demo: 2 of 5 floating-point tensors hold NaN or infinite values: "
                              "model.layers.0.self_attn.q_proj.weight, model.layers.1.mlp.down_proj.weight;")
    assert "\n" not in message and "download the base again" in message
    ref = BaseRef(source_dir=str(base), repo_id=None, revision="main", revision_sha=None, fingerprint="f",
                  is_vlm=False, model_type="llama")
    with pytest.raises(ValueError, match=f"base {base}: 2 of 5"):
        scan_base(ref)
    assert scan_base(ref.model_copy(update={"gguf_file": "x.gguf"}))["tensors"] == 0
    row.observed(f"ValueError in {time.monotonic() - start:.2f} s: {message[:120]}...")


def test_a_finite_base_passes_and_large_tensors_are_checked_in_chunks(tmp_path: Path, monkeypatch) -> None:
    from quantdag.format import scan

    root = tmp_path / "base"
    root.mkdir()
    save_file({"w": torch.ones(10, 10, dtype=torch.float16)}, str(root / "model.safetensors"))
    assert require_finite(root, "base") == 1
    monkeypatch.setattr(scan, "_CHUNK_ELEMENTS", 7)
    values = torch.zeros(50)
    values[49] = float("-inf")
    assert has_nonfinite(values) and not has_nonfinite(torch.zeros(50)) and not has_nonfinite(torch.arange(5))


def test_loaded_model_parameters_are_scanned_skipping_meta(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    assert find_nonfinite_weights(model) == ["1.bias"]
    with torch.device("meta"):
        offloaded = torch.nn.Linear(4, 4)
    assert find_nonfinite_weights(offloaded) == []
