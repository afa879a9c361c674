"""The file layout of a ModelOpt NVFP4 Hugging Face export: which tensor is where and what it is.

Reads only the export's JSON files and safetensors headers (no tensor data) and sorts every
tensor into what :mod:`quantdag.format.reader` does with it, naming every tensor or module that does
not fit the model class before anything is loaded. :class:`TensorReader` then reads tensors by
name.

Layout (ModelOpt 0.47 unified HF export, ``hf_quant_config.json`` ``quant_algo`` ``NVFP4``), per
quantized linear ``<m>``: ``<m>.weight`` uint8 ``[out, in/2]``, ``<m>.weight_scale``
float8_e4m3fn ``[out, in/16]``, ``<m>.weight_scale_2`` and ``<m>.input_scale`` float32 scalars,
optional ``<m>.bias``. A calibrated FP8 KV cache adds ``<attn>.k_proj.k_scale`` /
``<attn>.v_proj.v_scale`` (amax / 448); with a constant amax ("fp8_cast") there are none and the
scale is 1.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantdag.format.nvfp4 import BLOCK_SIZE

NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
KV_SCALE_SUFFIXES = {".k_proj.k_scale": 0, ".v_proj.v_scale": 1}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's safetensors header entry."""

    file: Path
    dtype: str  # safetensors dtype code: U8, F8_E4M3, BF16, F32, ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Plan:
    """Every checkpoint tensor sorted into what happens to it."""

    quantized: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> suffix -> key
    kv_scales: dict[str, dict[int, str]] = field(default_factory=dict)  # attention -> 0/1 -> key
    plain: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_hf_quant_config(export_dir: str | Path) -> dict[str, Any]:
    """Read the ``quantization`` section of an export's ``hf_quant_config.json``.

    Args:
        export_dir: directory written by ``modelopt.torch.export.export_hf_checkpoint``.

    Returns:
        The section as a dict: ``quant_algo``, ``kv_cache_quant_algo``, ``group_size``,
        ``exclude_modules``.

    Raises:
        ValueError: the file is missing or has no ``quantization`` section.
    """
    path = Path(export_dir) / "hf_quant_config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: export_dir must be a ModelOpt unified HF export")
    section = json.loads(path.read_text()).get("quantization")
    if not isinstance(section, dict):
        raise ValueError(f"{path} has no 'quantization' section")
    return section


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {
        name: TensorInfo(path, meta["dtype"], tuple(meta["shape"]), end - start)
        for name, meta in header.items()
        for start, end in [meta["data_offsets"]]
    }


def tensor_index(export_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of the export by name, from the index file or every ``*.safetensors`` header.

    Raises:
        ValueError: the export has no safetensors files.
    """
    index_path = export_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted({export_dir / name for name in weight_map.values()})
    else:
        files = sorted(export_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in {export_dir}")
    index: dict[str, TensorInfo] = {}
    for path in files:
        index.update(_read_safetensors_header(path))
    return index


def model_class_and_config(export_dir: Path) -> tuple[type, Any]:
    """The transformers class named by ``config.json``'s ``architectures[0]`` and the config.

    ``quantization_config`` is dropped from the config, so transformers attaches no quantizer.

    Raises:
        ValueError: ``architectures`` names no transformers model class.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(export_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the reader dequantizes; no transformers quantizer
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise ValueError(
            f"{export_dir / 'config.json'}: 'architectures' {architectures} names no transformers "
            "model class; set it to the class the checkpoint was exported from"
        )
    return model_cls, config


def check_quant_config(section: dict[str, Any], export_dir: Path) -> None:
    """Raise ValueError unless the ``quantization`` section is NVFP4 with group size 16."""
    if section.get("quant_algo") != "NVFP4":
        raise ValueError(
            f"{export_dir}: quant_algo is {section.get('quant_algo')!r}; "
            "this reader handles 'NVFP4' only"
        )
    if int(section.get("group_size", BLOCK_SIZE)) != BLOCK_SIZE:
        raise ValueError(
            f"{export_dir}: group_size {section.get('group_size')} is not NVFP4's {BLOCK_SIZE}"
        )


def plan_tensors(tensors: dict[str, TensorInfo], model: nn.Module, export_dir: Path) -> Plan:
    """Sort the tensors; ValueError naming every tensor or module that does not fit."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    ignore = [re.compile(p) for p in patterns]
    modules = dict(model.named_modules())
    scale_suffix = ".weight_scale"
    quantized_prefixes = {k[: -len(scale_suffix)] for k in tensors if k.endswith(scale_suffix)}
    state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan, problems = Plan(), []
    for key in sorted(tensors):
        if any(p.search(key) for p in ignore):
            plan.ignored.append(key)
            continue
        prefix, _, suffix = key.rpartition(".")
        if prefix in quantized_prefixes and suffix in (*NVFP4_SUFFIXES, "bias"):
            plan.quantized.setdefault(prefix, {})[suffix] = key
        elif (kv := next((s for s in KV_SCALE_SUFFIXES if key.endswith(s)), None)) is not None:
            plan.kv_scales.setdefault(key.removesuffix(kv), {})[KV_SCALE_SUFFIXES[kv]] = key
        elif key in state_shapes:
            plan.plain.append(key)
            if tensors[key].shape != state_shapes[key]:
                problems.append(f"{key}: shape {tensors[key].shape}, model has {state_shapes[key]}")
        else:
            problems.append(f"{key}: not a parameter or buffer of {type(model).__name__}")
    for prefix, parts in sorted(plan.quantized.items()):
        module = modules.get(prefix)
        missing = [s for s in NVFP4_SUFFIXES if s not in parts]
        if not isinstance(module, nn.Linear):
            problems.append(f"{prefix}: NVFP4 tensors for a module that is not an nn.Linear")
        elif missing:
            problems.append(f"{prefix}: NVFP4 tensors missing {missing}")
        else:
            infos = {suffix: tensors[key] for suffix, key in parts.items()}
            problems.extend(_check_nvfp4_layout(prefix, module, infos))
    for attention in plan.kv_scales:
        if attention not in modules:
            problems.append(f"{attention}: KV-cache scales for a module the model does not have")
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"{export_dir} does not match {type(model).__name__}:\n  {listing}")
    return plan


def _check_nvfp4_layout(prefix: str, module: nn.Linear, parts: dict[str, TensorInfo]) -> list[str]:
    out_f, in_f = module.out_features, module.in_features
    expected = {
        "weight": ("U8", (out_f, in_f // 2)),
        "weight_scale": ("F8_E4M3", (out_f, in_f // BLOCK_SIZE)),
        "weight_scale_2": ("F32", ()),
        "input_scale": ("F32", ()),
    }
    problems = []
    if in_f % BLOCK_SIZE:
        problems.append(f"{prefix}: in_features {in_f} is not a multiple of {BLOCK_SIZE}")
    for suffix, (dtype, shape) in expected.items():
        info = parts[suffix]
        scalar_ok = shape == () and info.shape == (1,)
        if info.dtype != dtype or (info.shape != shape and not scalar_ok):
            problems.append(
                f"{prefix}.{suffix}: {info.dtype} {info.shape}, expected {dtype} {shape}"
            )
    return problems


def unloaded_keys(model: nn.Module, plan: Plan) -> tuple[list[str], dict[str, str]]:
    """Model keys the checkpoint does not provide: (missing, {tied target: its loaded source})."""
    loaded = set(plan.plain)
    for prefix, parts in plan.quantized.items():
        loaded.update(f"{prefix}.{suffix}" for suffix in ("weight", "bias") if suffix in parts)
    tied_map = getattr(model, "_tied_weights_keys", None)
    tied_map = tied_map if isinstance(tied_map, dict) else {}
    unloaded = sorted(k for k in model.state_dict() if k not in loaded)
    tied = {k: tied_map[k] for k in unloaded if tied_map.get(k) in loaded}
    return [k for k in unloaded if k not in tied], tied


class TensorReader:
    """Reads tensors by name from the export's safetensors files, one open handle per file."""

    def __init__(self, tensors: dict[str, TensorInfo], stack: ExitStack) -> None:
        """Open every file that holds one of ``tensors``; ``stack`` closes them."""
        from safetensors import safe_open

        self._tensors = tensors
        self._handles = {
            path: stack.enter_context(safe_open(str(path), framework="pt"))
            for path in {info.file for info in tensors.values()}
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._tensors[key].file].get_tensor(key)
