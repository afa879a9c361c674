"""Convert an llm-compressor NVFP4 checkpoint (compressed-tensors) into ModelOpt's export layout.

The benchmark reads every NVFP4 checkpoint with the same code (``quantdag.format.reader``), which reads
NVIDIA Model Optimizer's unified Hugging Face export. llm-compressor saves NVFP4 through
compressed-tensors' ``nvfp4-pack-quantized`` format instead. The two store the same numbers
under other names, and the per-tensor scales are reciprocals of each other.

compressed-tensors 0.19.0 (what llm-compressor 0.14.0.1 installs), per quantized linear ``<m>``:

- ``<m>.weight_packed``: ``uint8 [out, in / 2]``; E2M1 codes (``sign << 3 | index`` into the
  magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), element ``2i`` in the low nibble of byte ``i`` and
  element ``2i + 1`` in the high nibble (``pack_fp4_to_uint8`` / ``unpack_fp4_from_uint8`` in
  ``compressed_tensors/compressors/nvfp4/helpers.py``).
- ``<m>.weight_scale``: ``float8_e4m3fn [out, in / 16]``, one scale per 16 elements along ``in``
  (``NVFP4PackedCompressor._compress_scale``, ``compressors/nvfp4/base.py``).
- ``<m>.weight_global_scale``: ``float32 [1]`` = ``448 * 6 / amax(|W|)`` (``generate_gparam`` in
  ``compressed_tensors/quantization/utils/helpers.py``; llm-compressor's observer computes it in
  the model dtype, so with a BF16 model the stored value is BF16-rounded). It is a QUANTIZATION
  multiplier: block scales are made as ``global_scale * block_amax / 6`` (``calculate_qparams``)
  and dequantization divides by it, ``x_q * (weight_scale / weight_global_scale)``
  (``quantization/lifecycle/forward_helpers.py``).
- ``<m>.input_global_scale``: ``float32 [1]`` = ``448 * 6 / amax(calibrated input)`` (observer
  ``static_minmax``: max over all calibration batches); activation block scales are dynamic
  (``dynamic: "local"``) and relative to it the same way.
- ``config.json`` ``quantization_config``: ``quant_method`` ``compressed-tensors``, ``format``
  ``nvfp4-pack-quantized``, ``config_groups``, ``ignore`` (modules kept in high precision),
  ``kv_cache_scheme``.

ModelOpt 0.47 (``modelopt/torch/quantization/qtensor/nvfp4_tensor.py``, ``modelopt/torch/export``):

- ``<m>.weight``: ``uint8 [out, in / 2]``, same codes and the same nibble order
  (``(q[..., 1::2] << 4) | q[..., 0::2]``);
- ``<m>.weight_scale``: ``float8_e4m3fn [out, in / 16]`` = ``block_amax / (6 * weight_scale_2)``;
- ``<m>.weight_scale_2``: ``float32 []`` = ``amax(|W|) / (6 * 448)``
  (``get_weights_scaling_factor_2``), a DEQUANTIZATION multiplier:
  ``e2m1 * weight_scale * weight_scale_2``;
- ``<m>.input_scale``: ``float32 []`` = ``amax / (6 * 448)`` (``get_activation_scaling_factor``);
- ``hf_quant_config.json`` ``{"quantization": {"quant_algo": "NVFP4", "group_size": 16,
  "kv_cache_quant_algo": ..., "exclude_modules": [...]}}``.

So the conversion copies ``weight_packed`` and ``weight_scale`` byte for byte and sets
``weight_scale_2 = 1 / weight_global_scale`` and ``input_scale = 1 / input_global_scale``
(computed in float64, rounded once to float32). Dequantizing ``x_q * s * (1 / g)`` instead of
``x_q * (s / g)`` differs by float32 rounding only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantdag.format.checkpoint import Checkpoint

CT_FORMAT = "nvfp4-pack-quantized"
"""compressed-tensors' format name for packed NVFP4 weights."""
BLOCK_SIZE = 16
"""Elements per E4M3 block scale."""
_CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`convert_checkpoint` wrote.

    Attributes:
        quantized_modules: module names converted to ModelOpt's NVFP4 tensors.
        copied_tensors: number of high-precision tensors copied unchanged.
        exclude_modules: ``exclude_modules`` written to ``hf_quant_config.json``.
    """

    quantized_modules: tuple[str, ...]
    copied_tensors: int
    exclude_modules: tuple[str, ...]


def reciprocal_scale(global_scale: torch.Tensor, name: str) -> torch.Tensor:
    """``1 / global_scale`` as ModelOpt's per-tensor scale: ``float32 []``.

    Args:
        global_scale: a compressed-tensors global scale, one element (``float32 [1]``).
        name: tensor name for error messages.

    Returns:
        ``float32 []``, the reciprocal computed in float64 and rounded once.

    Raises:
        ValueError: more than one element, or not finite and > 0.
    """
    if global_scale.numel() != 1:
        raise ValueError(f"{name}: expected one per-tensor value, got shape {tuple(global_scale.shape)}")
    value = global_scale.double().reshape(())
    if not bool(torch.isfinite(value)) or float(value) <= 0.0:
        raise ValueError(f"{name}: global scale must be finite and > 0, got {float(value)}")
    return (1.0 / value).to(torch.float32)


def _module_problems(prefix: str, parts: dict[str, torch.Tensor]) -> list[str]:
    missing = [s for s in _CT_SUFFIXES if s not in parts]
    if missing:
        hint = " (weight-only NVFP4A16 has no input scale; W4A4 NVFP4 is needed)" if missing == ["input_global_scale"] else ""
        return [f"{prefix}: missing {missing}{hint}"]
    packed, scale = parts["weight_packed"], parts["weight_scale"]
    problems = []
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        problems.append(f"{prefix}.weight_packed: {packed.dtype} {tuple(packed.shape)}, expected uint8 [out, in/2]")
    elif scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (packed.shape[0], packed.shape[1] * 2 // BLOCK_SIZE):
        problems.append(
            f"{prefix}.weight_scale: {scale.dtype} {tuple(scale.shape)}, expected float8_e4m3fn "
            f"{(packed.shape[0], packed.shape[1] * 2 // BLOCK_SIZE)}"
        )
    elif (packed.shape[1] * 2) % BLOCK_SIZE:
        problems.append(f"{prefix}: in_features {packed.shape[1] * 2} is not a multiple of {BLOCK_SIZE}")
    return problems


def convert_state_dict(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Rename and invert the NVFP4 tensors of a compressed-tensors state dict.

    Args:
        tensors: every tensor of the checkpoint by name. A module is NVFP4 when it has
            ``weight_packed``; it must then also have ``weight_scale`` (``float8_e4m3fn
            [out, in / 16]``), ``weight_global_scale`` and ``input_global_scale`` (``float32 [1]``).
            Other tensors (embeddings, norms, excluded linears) pass through unchanged.

    Returns:
        ``(converted, quantized_modules)``: ``converted`` has per NVFP4 module ``weight`` (the
        packed bytes), ``weight_scale`` (unchanged), ``weight_scale_2`` and ``input_scale``
        (``float32 []`` reciprocals) and any ``bias``; ``quantized_modules`` is sorted.

    Raises:
        ValueError: listing every module whose tensors are missing, mis-shaped or mis-typed, and
            every tensor with a suffix this converter does not know (e.g. ``weight_zero_point``
            of an asymmetric scheme) or a non-positive global scale.
    """
    prefixes = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    converted: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if prefix in groups and suffix in _CT_SUFFIXES:
            groups[prefix][suffix] = tensor
        elif prefix in groups and suffix == "bias":
            converted[key] = tensor
        elif prefix in groups:
            problems.append(f"{key}: unexpected tensor on an NVFP4 module (only {_CT_SUFFIXES} and bias)")
        elif suffix in _CT_SUFFIXES[1:]:
            problems.append(f"{key}: NVFP4 scale without {prefix}.weight_packed")
        else:
            converted[key] = tensor
    for prefix in prefixes:
        parts = groups[prefix]
        module_problems = _module_problems(prefix, parts)
        if module_problems:
            problems.extend(module_problems)
            continue
        try:
            converted[f"{prefix}.weight_scale_2"] = reciprocal_scale(parts["weight_global_scale"], f"{prefix}.weight_global_scale")
            converted[f"{prefix}.input_scale"] = reciprocal_scale(parts["input_global_scale"], f"{prefix}.input_global_scale")
        except ValueError as err:
            problems.append(str(err))
            continue
        converted[f"{prefix}.weight"] = parts["weight_packed"]
        converted[f"{prefix}.weight_scale"] = parts["weight_scale"]
    if problems:
        raise ValueError("cannot convert the compressed-tensors NVFP4 tensors:\n  " + "\n  ".join(problems))
    return converted, tuple(prefixes)


def _check_args(args: dict[str, Any] | None, where: str, dynamic: Any) -> list[str]:
    if args is None:
        return [f"{where}: absent (W4A4 NVFP4 needs both weights and input_activations)"]
    expected = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": BLOCK_SIZE,
                "symmetric": True, "dynamic": dynamic}
    return [f"{where}.{k} = {args.get(k)!r}, expected {v!r}" for k, v in expected.items() if args.get(k) != v]


def modelopt_quant_config(quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The ``hf_quant_config.json`` section for a compressed-tensors NVFP4 ``quantization_config``.

    Args:
        quantization_config: ``config.json``'s ``quantization_config`` written by llm-compressor.

    Returns:
        ``{"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
        "exclude_modules": <ignore>}``.

    Raises:
        ValueError: listing every field that is not W4A4 NVFP4 as described in the module
            docstring (another format, weight-only, asymmetric, static activation scales, a KV-cache
            scheme, which the reader cannot emulate from these tensors).
    """
    problems = []
    if quantization_config.get("quant_method") != "compressed-tensors":
        problems.append(f"quant_method = {quantization_config.get('quant_method')!r}, expected 'compressed-tensors'")
    groups = quantization_config.get("config_groups") or {}
    if not groups:
        problems.append("config_groups is empty")
    for name, group in groups.items():
        fmt = group.get("format") or quantization_config.get("format")
        if fmt != CT_FORMAT:
            problems.append(f"config_groups.{name}.format = {fmt!r}, expected {CT_FORMAT!r}")
        problems += _check_args(group.get("weights"), f"config_groups.{name}.weights", False)
        problems += _check_args(group.get("input_activations"), f"config_groups.{name}.input_activations", "local")
        if group.get("output_activations") is not None:
            problems.append(f"config_groups.{name}.output_activations is set; not part of NVFP4 W4A4")
    if quantization_config.get("kv_cache_scheme") is not None:
        problems.append("kv_cache_scheme is set; this converter writes no KV-cache scales")
    if problems:
        raise ValueError("not an llm-compressor NVFP4 W4A4 checkpoint:\n  " + "\n  ".join(problems))
    return {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": BLOCK_SIZE,
        "exclude_modules": list(quantization_config.get("ignore") or []),
    }


def convert_checkpoint(source_dir: str | Path, export_dir: str | Path, producer_version: str | None = None) -> ConversionSummary:
    """Write a ModelOpt-layout NVFP4 export from an llm-compressor ``save_compressed`` directory.

    Writes ``model.safetensors`` (one file: the benchmark's models are small), ``config.json``
    without ``quantization_config`` (``quantdag.format.reader`` builds the plain model class from it),
    ``hf_quant_config.json``, and the tokenizer and generation files found in ``source_dir``.

    Args:
        source_dir: directory with ``config.json`` (compressed-tensors ``quantization_config``)
            and ``model.safetensors`` (or ``model.safetensors.index.json`` and its shards).
        export_dir: destination; created if missing.
        producer_version: llm-compressor version recorded as the producer in ``hf_quant_config.json``.

    Returns:
        :class:`ConversionSummary`.

    Raises:
        ValueError: see :func:`modelopt_quant_config` and :func:`convert_state_dict`; also when
            ``config.json`` is missing, and (``CheckpointFileError``) when neither
            ``model.safetensors`` nor ``model.safetensors.index.json`` is there or a file is
            malformed.
    """
    from safetensors.torch import save_file

    source, export = Path(source_dir), Path(export_dir)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: source_dir must be a save_pretrained directory")
    config = json.loads(config_path.read_text())
    if "quantization_config" not in config:
        raise ValueError(f"{config_path} has no quantization_config: not a compressed checkpoint")
    section = modelopt_quant_config(config.pop("quantization_config"))
    checkpoint = Checkpoint(source)
    converted, modules = convert_state_dict(dict(checkpoint.read(checkpoint.tensors)))
    export.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(export / "model.safetensors"), metadata={"format": "pt"})
    (export / "config.json").write_text(json.dumps(config, indent=2))
    producer = {"name": "llmcompressor (converted by benchmarks/peer_convert.py)", "version": producer_version}
    (export / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": section}, indent=4))
    for name in _SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, export / name)
    copied = len(converted) - sum(1 for m in modules for s in ("weight", "weight_scale", "weight_scale_2", "input_scale"))
    return ConversionSummary(quantized_modules=modules, copied_tensors=copied, exclude_modules=tuple(section["exclude_modules"]))
