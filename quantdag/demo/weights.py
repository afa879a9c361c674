"""Tensor names, shapes and initial values of a synthetic Qwen3.5 checkpoint, written shard by shard.

Names and shapes come from the transformers modules themselves, built on the `meta` device (no
memory), so they match what `from_pretrained` expects for the installed transformers. The MTP
head is not part of the transformers model (its loader ignores `^mtp.*`); its names follow the
Qwen3-Next / Qwen3.5 release layout that serving engines read:

    mtp.fc.weight                      [hidden, 2 * hidden]  projects concat(embedding, hidden state)
    mtp.pre_fc_norm_embedding.weight   [hidden]              RMSNorm of the next token's embedding
    mtp.pre_fc_norm_hidden.weight      [hidden]              RMSNorm of the last hidden state
    mtp.layers.{i}.*                   one full-attention decoder layer, named as in the LM
    mtp.norm.weight                    [hidden]              final RMSNorm before the shared lm_head

The MTP head shares `embed_tokens` and `lm_head` with the LM (`mtp_use_dedicated_embeddings`
false). ModelOpt's Megatron exporter maps `model.language_model.layers.{i}.` to `mtp.layers.{i}.`
for Qwen3.5 and copies the remaining `mtp.*` tensors from the source checkpoint unchanged.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    import torch
    from transformers import Qwen3_5Config

Init = Literal["normal", "zeros", "ones", "a_log"]
_CHUNK = 1 << 24  # elements generated per step: bounds the float32 scratch to 64 MiB


class TensorSpec(NamedTuple):
    """One checkpoint tensor: safetensors key, shape, and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: Init


def _module_specs(root: torch.nn.Module, prefix: str) -> list[TensorSpec]:
    """Specs for every parameter under `root`, classified by the module that owns it."""
    from torch import nn
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    plain_norms = (nn.LayerNorm, m.Qwen3_5RMSNormGated)
    specs = []
    for module_name, module in root.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{prefix}{module_name}.{param_name}" if module_name else f"{prefix}{param_name}"
            if isinstance(module, m.Qwen3_5RMSNorm):
                init: Init = "zeros"  # output = x_normed * (1 + weight)
            elif isinstance(module, plain_norms) or type(module).__name__ == "FusedRMSNormGated":
                init = "ones" if param_name == "weight" else "zeros"
            elif param_name == "A_log":
                init = "a_log"
            elif param_name == "dt_bias":
                init = "ones"
            elif param_name == "bias":
                init = "zeros"
            else:
                init = "normal"
            specs.append(TensorSpec(name, tuple(param.shape), init))
    return specs


def model_specs(config: Qwen3_5Config) -> list[TensorSpec]:
    """Specs of every tensor `Qwen3_5ForConditionalGeneration(config)` loads, in module order.

    Raises:
        RuntimeError: If the model's state dict has entries that are not parameters (a persistent
            buffer this writer would not know how to fill).
    """
    import torch
    from transformers import Qwen3_5ForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(config)
    specs = _module_specs(model, "")
    unknown = sorted(set(model.state_dict()) - {s.name for s in specs})
    if unknown:
        raise RuntimeError(f"state dict entries without an init rule: {unknown[:10]}")
    return specs


def mtp_specs(config: Qwen3_5Config) -> list[TensorSpec]:
    """Specs of the `mtp.*` tensors: `config.text_config.mtp_num_hidden_layers` full-attention layers."""
    import torch
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer

    text = config.text_config
    num_layers = int(getattr(text, "mtp_num_hidden_layers", 0) or 0)
    if num_layers == 0:
        return []
    fields = text.to_dict()
    fields.update(num_hidden_layers=1, layer_types=["full_attention"])
    layer_config = Qwen3_5TextConfig(**fields)
    hidden = text.hidden_size
    specs = [
        TensorSpec("mtp.fc.weight", (hidden, 2 * hidden), "normal"),
        TensorSpec("mtp.pre_fc_norm_embedding.weight", (hidden,), "zeros"),
        TensorSpec("mtp.pre_fc_norm_hidden.weight", (hidden,), "zeros"),
    ]
    for index in range(num_layers):
        with torch.device("meta"):
            layer = Qwen3_5DecoderLayer(layer_config, layer_idx=0)
        specs += _module_specs(layer, f"mtp.layers.{index}.")
    specs.append(TensorSpec("mtp.norm.weight", (hidden,), "zeros"))
    return specs


def _generator(seed: int, name: str) -> torch.Generator:
    import torch

    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype, std: float = 0.02) -> torch.Tensor:
    """Materialise one tensor on the CPU; random values depend only on (`seed`, `spec.name`).

    Args:
        spec: What to build.
        seed: Run seed.
        dtype: Output dtype (random values are drawn in float32, then cast).
        std: Standard deviation of "normal" tensors.

    Returns:
        A contiguous tensor of `spec.shape` and `dtype`.
    """
    import torch

    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    generator = _generator(seed, spec.name)
    if spec.init == "a_log":
        return torch.empty(spec.shape).uniform_(1.0, 16.0, generator=generator).log_().to(dtype)
    out = torch.empty(spec.shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        flat[start:stop] = torch.empty(stop - start).normal_(0.0, std, generator=generator)
    return out


def plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split `specs` in order into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = itemsize
        for dim in spec.shape:
            nbytes *= dim
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(
    out_dir: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, max_shard_bytes: int
) -> list[Path]:
    """Write `specs` as `model.safetensors`, or as numbered shards plus `model.safetensors.index.json`.

    Earlier `model*.safetensors` files and index in `out_dir` are removed first, so a rebuild with
    other sizes leaves no stale shard. Peak memory is about one shard.

    Returns:
        The safetensors files written, in order.
    """
    import json

    from safetensors.torch import save_file

    counts = Counter(s.name for s in specs)
    duplicated = sorted(name for name, count in counts.items() if count > 1)
    if duplicated:
        raise RuntimeError(f"duplicate tensor names: {duplicated}")
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    itemsize = _itemsize(dtype)
    shards = plan_shards(specs, itemsize, max_shard_bytes)
    if len(shards) == 1:
        files = [out_dir / "model.safetensors"]
    else:
        files = [out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for path, shard in zip(files, shards, strict=True):
        tensors = {spec.name: make_tensor(spec, seed, dtype) for spec in shard}
        total += sum(t.numel() * itemsize for t in tensors.values())
        save_file(tensors, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates files owner-only; a checkpoint is read by servers too
        weight_map.update({name: path.name for name in tensors})
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
