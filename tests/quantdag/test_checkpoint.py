"""quantdag.format.checkpoint: the one view of a safetensors checkpoint, on hand-written files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantdag.format.checkpoint import Checkpoint, CheckpointFileError, TensorInfo

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randint(0, 256, (8, 4), dtype=torch.uint8),
        "model.layers.0.mlp.up_proj.weight_scale": torch.rand(8, 1).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.up_proj.weight_scale_2": torch.tensor(0.5),
        "lm_head.weight": torch.randn(16, 8, generator=generator).bfloat16(),
        "mtp.fc.weight": torch.randn(8, 16, generator=generator).bfloat16(),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _write_sharded(root: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Two shards and an index; returns the weight map."""
    names = sorted(tensors)
    weight_map = {name: SHARDS[i * 2 // len(names)] for i, name in enumerate(names)}
    for shard in SHARDS:
        part = {n: tensors[n] for n in names if weight_map[n] == shard}
        save_file(part, root / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_single_file_headers_and_values(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = Checkpoint(tmp_path)
    assert list(checkpoint.tensors) == sorted(tensors)
    assert checkpoint.tensors["model.layers.0.mlp.up_proj.weight_scale"] == TensorInfo(
        "model.safetensors", "F8_E4M3", (8, 1), 8
    )
    assert str(checkpoint.tensors["lm_head.weight"]) == "BF16[16, 8]"
    assert checkpoint.tensors["lm_head.weight"].nbytes == 16 * 8 * 2
    assert checkpoint.tensors["model.layers.0.mlp.up_proj.weight_scale_2"].shape == ()
    assert set(checkpoint.modules["model.layers.0.mlp.up_proj"]) == {
        "weight", "weight_scale", "weight_scale_2"
    }
    names = ["mtp.fc.weight", "model.layers.0.mlp.up_proj.weight_scale"]
    read = list(checkpoint.read(names))
    assert [name for name, _ in read] == names, "read keeps the caller's order"
    for name, tensor in read:
        assert _same_bytes(tensor, tensors[name]), name


def test_sharded_checkpoint_follows_the_index(tmp_path: Path) -> None:
    tensors = _tensors()
    weight_map = _write_sharded(tmp_path, tensors)
    save_file({"stray": torch.zeros(1)}, tmp_path / "consolidated.safetensors")
    checkpoint = Checkpoint(tmp_path)
    expected_order = sorted(tensors, key=lambda n: (weight_map[n], n))
    assert list(checkpoint.tensors) == expected_order, "ordered by shard, then by name"
    assert {n: i.file for n, i in checkpoint.tensors.items()} == weight_map
    with checkpoint.reader() as reader:
        for name in reversed(expected_order):
            assert _same_bytes(reader[name], tensors[name]), name
        with pytest.raises(KeyError, match="stray"):
            reader["stray"]


def test_an_index_naming_an_absent_tensor_names_the_shard(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["mtp.extra.weight"] = SHARDS[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=r"lacks 1 indexed tensors: \['mtp.extra.weight'\]") as raised:
        Checkpoint(tmp_path, "export").tensors
    assert raised.value.path == f"export:{SHARDS[1]}"


def test_an_index_without_weight_map_names_the_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointFileError, match="has no weight_map") as raised:
        Checkpoint(tmp_path, "base").tensors
    assert raised.value.path == "base:model.safetensors.index.json"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda data: data[:5], "bad header length"),
    (lambda data: (10**12).to_bytes(8, "little") + data[8:], "bad header length"),
    (lambda data: data[:8] + b"#" + data[9:], "malformed safetensors header"),
    (lambda data: data[:-3], "past the data"),
])
def test_a_corrupt_file_is_named_by_its_path(tmp_path: Path, damage, message: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointFileError, match=message) as raised:
        Checkpoint(tmp_path).tensors
    assert raised.value.path == str(path)
    assert isinstance(raised.value, ValueError)


def test_a_directory_without_safetensors_names_the_expected_file(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointFileError, match="neither model.safetensors nor") as raised:
        Checkpoint(tmp_path, "export").tensors
    assert raised.value.path == "export:model.safetensors"


def test_json_side_files_name_the_file(tmp_path: Path) -> None:
    checkpoint = Checkpoint(tmp_path, "export")
    with pytest.raises(CheckpointFileError, match="file is missing") as raised:
        checkpoint.quantization()
    assert raised.value.path == "export:hf_quant_config.json"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFileError, match="unreadable JSON") as raised:
        checkpoint.json("config.json")
    assert raised.value.path == "export:config.json"
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointFileError, match="is not a JSON object"):
        checkpoint.json("generation_config.json")
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"producer": {}}))
    with pytest.raises(CheckpointFileError, match="has no 'quantization' object"):
        Checkpoint(tmp_path).quantization()
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    assert Checkpoint(tmp_path).quantization() == {"quant_algo": "NVFP4"}
