"""The layout of a ModelOpt export (NVFP4, W4A16 NVFP4, FP8, mixed), checked against a model class before anything is loaded.

Layout (ModelOpt 0.47 unified HF export, ``hf_quant_config.json`` ``quant_algo`` ``NVFP4``), per
quantized linear ``<m>``: ``<m>.weight`` uint8 ``[out, in/2]``, ``<m>.weight_scale``
float8_e4m3fn ``[out, in/16]``, ``<m>.weight_scale_2`` and ``<m>.input_scale`` float32 scalars,
optional ``<m>.bias``. ``W4A16_NVFP4`` has the same tensors but no ``input_scale`` (activations stay
high precision); ``FP8`` is :mod:`quantdag.format.fp8`'s layout. A ``MIXED_PRECISION`` export
names each quantized linear's ``quant_algo`` under ``quantization.quantized_layers``
(:func:`module_algo`). A calibrated FP8 KV cache adds ``<attn>.k_proj.k_scale`` /
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
from quantdag.format.fp8 import FP8_SUFFIXES, fp8_layout_problems
from quantdag.format.nvfp4 import BLOCK_SIZE

NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
REQUIRED_SUFFIXES: dict[str, tuple[str, ...]] = {
    "NVFP4": NVFP4_SUFFIXES, "W4A16_NVFP4": NVFP4_SUFFIXES[:3], "FP8": FP8_SUFFIXES}
"""``quant_algo`` of a linear -> the tensors it must have (``bias`` is optional)."""
MIXED = "MIXED_PRECISION"
_QUANTIZED_LEAVES = ("weight", "weight_scale", "weight_scale_2", "input_scale", "bias")
KV_SCALE_SUFFIXES = {".k_proj.k_scale": 0, ".v_proj.v_scale": 1}


@dataclass
class Plan:
    """Every checkpoint tensor sorted into what happens to it."""

    quantized: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> suffix -> key
    algos: dict[str, str] = field(default_factory=dict)  # quantized module -> quant_algo (NVFP4, W4A16_NVFP4, FP8)
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
    """The export's ``hf_quant_config.json`` ``quantization`` section, checked to be a format this reader knows.

    Returns:
        The section: ``quant_algo``, ``kv_cache_quant_algo``, ``group_size``, ``exclude_modules``
        (and ``quantized_layers`` for ``MIXED_PRECISION``).

    Raises:
        CheckpointFileError: the file is missing, malformed or has no ``quantization`` section.
        ValueError: ``quant_algo`` (or a mixed export's per-layer one) is not one of
            :data:`REQUIRED_SUFFIXES`, or an NVFP4 ``group_size`` is not 16.
    """
    section = checkpoint.quantization()
    algo = section.get("quant_algo")
    layers = section.get("quantized_layers") if algo == MIXED else {"": section}
    if algo not in (*REQUIRED_SUFFIXES, MIXED) or not isinstance(layers, dict):
        raise ValueError(
            f"{checkpoint.root}: quant_algo is {algo!r}; this reader handles {sorted(REQUIRED_SUFFIXES)} and {MIXED} "
            "(with a quantized_layers table)"
        )
    for layer, config in layers.items():
        where = f" (quantized_layers[{layer!r}])" if layer else ""
        if not isinstance(config, dict) or config.get("quant_algo") not in REQUIRED_SUFFIXES:
            got = config.get("quant_algo") if isinstance(config, dict) else config
            raise ValueError(f"{checkpoint.root}: quant_algo {got!r}{where} is not one of {sorted(REQUIRED_SUFFIXES)}")
        if "NVFP4" in config["quant_algo"] and int(config.get("group_size", BLOCK_SIZE)) != BLOCK_SIZE:
            raise ValueError(
                f"{checkpoint.root}: group_size {config.get('group_size')}{where} is not NVFP4's {BLOCK_SIZE}"
            )
    return section


def module_algo(section: Mapping[str, Any], module: str) -> str | None:
    """The ``quant_algo`` of one quantized linear: the export's, or its ``quantized_layers`` entry when mixed."""
    if section.get("quant_algo") != MIXED:
        return section.get("quant_algo")
    return (section.get("quantized_layers") or {}).get(module, {}).get("quant_algo")


def layout_problems(algo: str | None, out_features: int, in_features: int, parts: Mapping[str, TensorInfo]) -> list[str]:
    """Missing tensors and dtype/shape problems of one quantized linear of format ``algo``.

    Returns:
        One line per problem (:func:`nvfp4_layout_problems`, :func:`quantdag.format.fp8.fp8_layout_problems`,
        a tensor the format lacks or has too many); empty when the layout fits.
    """
    if algo not in REQUIRED_SUFFIXES:
        return [f"has scales but its quant_algo is {algo!r} (not in quantized_layers, or unknown)"]
    required = REQUIRED_SUFFIXES[algo]
    missing = [leaf for leaf in required if leaf not in parts]
    problems = [f"{'NVFP4' if 'NVFP4' in algo else algo} tensors missing {missing}"] if missing else []
    problems += [f"{leaf} is not part of {algo}" for leaf in parts if leaf in NVFP4_SUFFIXES and leaf not in required]
    check = fp8_layout_problems if algo == "FP8" else nvfp4_layout_problems
    return problems + check(out_features, in_features, {k: v for k, v in parts.items() if k in required})


def plan_tensors(checkpoint: Checkpoint, model: nn.Module) -> Plan:
    """Sort the checkpoint's tensors for ``model``, from the headers only (formats from ``hf_quant_config.json``).

    Raises:
        ValueError: names every tensor or module that does not fit the model class.
        CheckpointFileError: a safetensors file or the index is missing or malformed.
    """
    tensors = checkpoint.tensors
    section = checkpoint.quantization()
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
        if prefix in quantized_prefixes and suffix in _QUANTIZED_LEAVES:
            plan.quantized.setdefault(prefix, {})[suffix] = key
            plan.algos[prefix] = module_algo(section, prefix)
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
        if not isinstance(module, nn.Linear):
            problems.append(f"{prefix}: quantized tensors for a module that is not an nn.Linear")
        else:
            infos = {suffix: tensors[key] for suffix, key in parts.items() if suffix != "bias"}
            found = layout_problems(plan.algos[prefix], module.out_features, module.in_features, infos)
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
