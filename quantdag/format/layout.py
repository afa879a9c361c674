"""The NVFP4 layout of a ModelOpt export, checked against a model class before anything is loaded.

Layout (ModelOpt 0.47 unified HF export, ``hf_quant_config.json`` ``quant_algo`` ``NVFP4``), per
quantized linear ``<m>``: ``<m>.weight`` uint8 ``[out, in/2]``, ``<m>.weight_scale``
float8_e4m3fn ``[out, in/16]``, ``<m>.weight_scale_2`` and ``<m>.input_scale`` float32 scalars,
optional ``<m>.bias``. A calibrated FP8 KV cache adds ``<attn>.k_proj.k_scale`` /
``<attn>.v_proj.v_scale`` (amax / 448); with a constant amax ("fp8_cast") there are none and the
scale is 1.

:func:`plan_tensors` sorts every tensor of a :class:`~quantdag.format.checkpoint.Checkpoint` into
what :mod:`quantdag.format.reader` does with it, naming every tensor or module that does not fit
the model class; :func:`nvfp4_layout_problems` is the per-linear check, shared with the audit.
Only the JSON files and safetensors headers are read here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from quantdag.format.checkpoint import Checkpoint, TensorInfo
from quantdag.format.nvfp4 import BLOCK_SIZE

NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
KV_SCALE_SUFFIXES = {".k_proj.k_scale": 0, ".v_proj.v_scale": 1}


@dataclass
class Plan:
    """Every checkpoint tensor sorted into what happens to it."""

    quantized: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> suffix -> key
    kv_scales: dict[str, dict[int, str]] = field(default_factory=dict)  # attention -> 0/1 -> key
    plain: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def nvfp4_layout_problems(
    out_features: int, in_features: int, parts: Mapping[str, TensorInfo]
) -> list[str]:
    """How the stored NVFP4 tensors of an ``[out, in]`` linear depart from ModelOpt's layout.

    Expected: ``weight`` U8 ``[out, in/2]`` (two E2M1 values a byte), ``weight_scale`` F8_E4M3
    ``[out, in/16]``, ``weight_scale_2`` and ``input_scale`` F32 scalars (``[]`` or ``[1]``).
    Leaves absent from ``parts`` are not reported.

    Args:
        out_features: the linear's output features.
        in_features: the linear's input features (the reduction dim, blocked by 16).
        parts: header entries of the module's tensors by leaf (``weight``, ``weight_scale``, ...).

    Returns:
        One line per problem (``weight_scale is F8_E4M3[64, 3], expected F8_E4M3[64, 4]``); empty
        when the layout fits.
    """
    problems = []
    if in_features % BLOCK_SIZE:
        problems.append(f"in_features {in_features} is not a multiple of {BLOCK_SIZE}")
    blocked = {
        "weight": ("U8", (out_features, in_features // 2)),
        "weight_scale": ("F8_E4M3", (out_features, in_features // BLOCK_SIZE)),
    }
    for leaf, (dtype, shape) in blocked.items():
        info = parts.get(leaf)
        if info is not None and (info.dtype, info.shape) != (dtype, shape):
            problems.append(f"{leaf} is {info}, expected {dtype}{list(shape)}")
    for leaf in ("weight_scale_2", "input_scale"):
        info = parts.get(leaf)
        if info is not None and (info.dtype != "F32" or info.shape not in ((), (1,))):
            problems.append(f"{leaf} is {info}, expected an F32 scalar")
    return problems


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


def check_quant_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The export's ``hf_quant_config.json`` ``quantization`` section, checked to be NVFP4.

    Returns:
        The section: ``quant_algo``, ``kv_cache_quant_algo``, ``group_size``, ``exclude_modules``.

    Raises:
        CheckpointFileError: the file is missing, malformed or has no ``quantization`` section.
        ValueError: ``quant_algo`` is not ``NVFP4`` or ``group_size`` is not 16.
    """
    section = checkpoint.quantization()
    if section.get("quant_algo") != "NVFP4":
        raise ValueError(
            f"{checkpoint.root}: quant_algo is {section.get('quant_algo')!r}; "
            "this reader handles 'NVFP4' only"
        )
    if int(section.get("group_size", BLOCK_SIZE)) != BLOCK_SIZE:
        raise ValueError(
            f"{checkpoint.root}: group_size {section.get('group_size')} is not NVFP4's {BLOCK_SIZE}"
        )
    return section


def plan_tensors(checkpoint: Checkpoint, model: nn.Module) -> Plan:
    """Sort the checkpoint's tensors for ``model``, from the headers only.

    Raises:
        ValueError: names every tensor or module that does not fit the model class.
        CheckpointFileError: a safetensors file or the index is missing or malformed.
    """
    tensors = checkpoint.tensors
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
            found = nvfp4_layout_problems(module.out_features, module.in_features, infos)
            problems.extend(f"{prefix}: {problem}" for problem in found)
    for attention in plan.kv_scales:
        if attention not in modules:
            problems.append(f"{attention}: KV-cache scales for a module the model does not have")
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"{checkpoint.root} does not match {type(model).__name__}:\n  {listing}")
    return plan


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
