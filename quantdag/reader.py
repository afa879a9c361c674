"""Read a ModelOpt NVFP4 Hugging Face export back into a runnable CPU model.

ModelOpt's own NVFP4 fake quantization needs CUDA, so on the CPU the project evaluates the
exported FILES: :func:`load_nvfp4_model` builds the transformers model from the export's
``config.json``, dequantizes every NVFP4 linear layer into an :class:`NVFP4Linear` (which
fake-quantizes its input at run time with the stored ``input_scale``), loads the excluded
layers in high precision, and optionally fake-quantizes the FP8 KV cache. The format itself
lives in :mod:`quantdag.nvfp4`.

Checkpoint layout read here (ModelOpt 0.47 unified HF export, ``hf_quant_config.json``
``quant_algo`` ``NVFP4``), per quantized linear ``<m>``: ``<m>.weight`` uint8 ``[out, in/2]``,
``<m>.weight_scale`` float8_e4m3fn ``[out, in/16]``, ``<m>.weight_scale_2`` and
``<m>.input_scale`` float32 scalars, optional ``<m>.bias``. A calibrated FP8 KV cache adds
``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale`` (amax / 448); with a constant amax
("fp8_cast") there are none and the scale is 1.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantdag.nvfp4 import (
    BLOCK_SIZE,
    E4M3_MAX,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_e4m3,
)

_NVFP4_SUFFIXES = ("weight", "weight_scale", "weight_scale_2", "input_scale")
_KV_SCALE_SUFFIXES = {".k_proj.k_scale": 0, ".v_proj.v_scale": 1}
_FP8_KV_ATTENTION_PREFIX = "fp8_kv_"


class NVFP4Linear(nn.Linear):
    """A linear layer of an NVFP4 export: dequantized weight, NVFP4 fake-quantized input.

    ``forward(x) = F.linear(fake_quantize_activation(x, input_scale), weight, bias)``, so the
    activations see the same dynamic per-16 E4M3 block scales and E2M1 rounding that NVFP4
    W4A4 inference applies.

    Attributes:
        weight: dequantized weight, ``[out, in]`` in the model dtype (not trainable).
        bias: optional ``[out]``.
        input_scale: ``float32 []`` buffer, the exported ``input_scale`` (amax / (6 * 448)).
        block_size: activation block size (16).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        input_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        """Wrap an already dequantized weight.

        Args:
            weight: float ``[out, in]``, ``in`` a multiple of ``block_size``.
            input_scale: float32 scalar, the exported activation scale.
            bias: float ``[out]`` or None.
            block_size: activation block size.

        Raises:
            ValueError: ``weight`` is not 2-D with ``in`` a multiple of ``block_size``.
        """
        if weight.ndim != 2 or weight.shape[1] % block_size:
            raise ValueError(
                f"weight must be [out, in] with in a multiple of {block_size}, "
                f"got {tuple(weight.shape)}"
            )
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: ``[..., in]`` activations.

        Returns:
            ``[..., out]`` in the weight's dtype.
        """
        quantized = fake_quantize_activation(x, self.input_scale, self.block_size)
        return F.linear(quantized.to(self.weight.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nvfp4 W4A4, input_scale={float(self.input_scale):.3e}"


@dataclass(frozen=True)
class LoadedNVFP4Model:
    """What :func:`load_nvfp4_model` returns.

    Attributes:
        model: the transformers model in eval mode, quantized linears as :class:`NVFP4Linear`.
        quant_algo: ``hf_quant_config.json`` ``quant_algo`` (``NVFP4``).
        kv_cache_quant_algo: ``kv_cache_quant_algo`` from the same file (``FP8``) or None.
        kv_cache_fake_quant: True when K and V are fake-quantized to E4M3 at run time.
        quantized_modules: names of the modules loaded as :class:`NVFP4Linear`.
        exclude_modules: ``exclude_modules`` patterns of the export (kept in high precision).
        ignored_keys: checkpoint tensors the model class does not have and declares ignorable
            (``mtp.*`` for Qwen3.5), left unread.
    """

    model: nn.Module
    quant_algo: str
    kv_cache_quant_algo: str | None
    kv_cache_fake_quant: bool
    quantized_modules: tuple[str, ...]
    exclude_modules: tuple[str, ...]
    ignored_keys: tuple[str, ...]


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str  # safetensors dtype code: U8, F8_E4M3, BF16, F32, ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class _Plan:
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


def _read_safetensors_header(path: Path) -> dict[str, _TensorInfo]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {
        name: _TensorInfo(path, meta["dtype"], tuple(meta["shape"]), end - start)
        for name, meta in header.items()
        for start, end in [meta["data_offsets"]]
    }


def _tensor_index(export_dir: Path) -> dict[str, _TensorInfo]:
    index_path = export_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = sorted({export_dir / name for name in weight_map.values()})
    else:
        files = sorted(export_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in {export_dir}")
    index: dict[str, _TensorInfo] = {}
    for path in files:
        index.update(_read_safetensors_header(path))
    return index


def _model_class_and_config(export_dir: Path) -> tuple[type, Any]:
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


def _check_quant_config(section: dict[str, Any], export_dir: Path) -> None:
    if section.get("quant_algo") != "NVFP4":
        raise ValueError(
            f"{export_dir}: quant_algo is {section.get('quant_algo')!r}; "
            "this reader handles 'NVFP4' only"
        )
    if int(section.get("group_size", BLOCK_SIZE)) != BLOCK_SIZE:
        raise ValueError(
            f"{export_dir}: group_size {section.get('group_size')} is not NVFP4's {BLOCK_SIZE}"
        )


def _plan(tensors: dict[str, _TensorInfo], model: nn.Module, export_dir: Path) -> _Plan:
    """Sort the tensors; ValueError naming every tensor or module that does not fit."""
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    ignore = [re.compile(p) for p in patterns]
    modules = dict(model.named_modules())
    scale_suffix = ".weight_scale"
    quantized_prefixes = {k[: -len(scale_suffix)] for k in tensors if k.endswith(scale_suffix)}
    state_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan, problems = _Plan(), []
    for key in sorted(tensors):
        if any(p.search(key) for p in ignore):
            plan.ignored.append(key)
            continue
        prefix, _, suffix = key.rpartition(".")
        if prefix in quantized_prefixes and suffix in (*_NVFP4_SUFFIXES, "bias"):
            plan.quantized.setdefault(prefix, {})[suffix] = key
        elif (kv := next((s for s in _KV_SCALE_SUFFIXES if key.endswith(s)), None)) is not None:
            plan.kv_scales.setdefault(key.removesuffix(kv), {})[_KV_SCALE_SUFFIXES[kv]] = key
        elif key in state_shapes:
            plan.plain.append(key)
            if tensors[key].shape != state_shapes[key]:
                problems.append(f"{key}: shape {tensors[key].shape}, model has {state_shapes[key]}")
        else:
            problems.append(f"{key}: not a parameter or buffer of {type(model).__name__}")
    for prefix, parts in sorted(plan.quantized.items()):
        module = modules.get(prefix)
        missing = [s for s in _NVFP4_SUFFIXES if s not in parts]
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


def _check_nvfp4_layout(prefix: str, module: nn.Linear, parts: dict[str, _TensorInfo]) -> list[str]:
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


def _unloaded_keys(model: nn.Module, plan: _Plan) -> tuple[list[str], dict[str, str]]:
    """Model keys the checkpoint does not provide: (missing, {tied target: its loaded source})."""
    loaded = set(plan.plain)
    for prefix, parts in plan.quantized.items():
        loaded.update(f"{prefix}.{suffix}" for suffix in ("weight", "bias") if suffix in parts)
    tied_map = getattr(model, "_tied_weights_keys", None)
    tied_map = tied_map if isinstance(tied_map, dict) else {}
    unloaded = sorted(k for k in model.state_dict() if k not in loaded)
    tied = {k: tied_map[k] for k in unloaded if tied_map.get(k) in loaded}
    return [k for k in unloaded if k not in tied], tied


class _TensorReader:
    """Reads tensors by name from the export's safetensors files, one open handle per file."""

    def __init__(self, tensors: dict[str, _TensorInfo], stack: ExitStack) -> None:
        from safetensors import safe_open

        self._tensors = tensors
        self._handles = {
            path: stack.enter_context(safe_open(str(path), framework="pt"))
            for path in {info.file for info in tensors.values()}
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._tensors[key].file].get_tensor(key)


def _iter_kv_attention_modules(
    model: nn.Module, exclude_modules: list[str]
) -> Iterator[tuple[str, nn.Module]]:
    """Attention modules whose K/V ModelOpt quantizes: with k_proj and v_proj, not excluded."""
    for name, module in model.named_modules():
        has_kv = all(isinstance(getattr(module, a, None), nn.Module) for a in ("k_proj", "v_proj"))
        if has_kv and not any(fnmatch.fnmatchcase(name, p) for p in exclude_modules):
            yield name, module


def _fp8_kv_attention(base: str) -> str:
    """Register (once) an attention function that fake-quantizes K/V to E4M3, then runs ``base``.

    Only modules carrying an ``fp8_kv_amax`` attribute (amax of K, amax of V) are quantized;
    others (a vision tower) pass through. K and V are taken at the attention function's input,
    after RoPE and the cache update, where ModelOpt's ``k_bmm_quantizer`` / ``v_bmm_quantizer``
    sit; re-quantizing cached E4M3 values is the identity.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{_FP8_KV_ATTENTION_PREFIX}{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    if base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not registered with transformers")

    def attention(module: nn.Module, query, key, value, *args, **kwargs):
        amax = getattr(module, "fp8_kv_amax", None)
        if amax is not None:
            key = fake_quantize_e4m3(key, amax[0]).to(key.dtype)
            value = fake_quantize_e4m3(value, amax[1]).to(value.dtype)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _enable_fp8_kv(
    model: nn.Module, plan: _Plan, reader: _TensorReader, exclude_modules: list[str]
) -> None:
    for name, module in _iter_kv_attention_modules(model, exclude_modules):
        scales = plan.kv_scales.get(name, {})
        module.fp8_kv_amax = tuple(
            float(reader[scales[i]].float().reshape(())) * E4M3_MAX if i in scales else E4M3_MAX
            for i in (0, 1)
        )
    base = model.config._attn_implementation or "sdpa"
    if not base.startswith(_FP8_KV_ATTENTION_PREFIX):
        model.set_attn_implementation(_fp8_kv_attention(base))


@torch.no_grad()
def load_nvfp4_model(
    export_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    fake_quant_kv: bool = True,
) -> LoadedNVFP4Model:
    """Load a ModelOpt NVFP4 export as a transformers model that runs on the CPU.

    The model class is ``config.json``'s ``architectures[0]`` (``quantization_config`` is dropped so
    transformers attaches no quantizer); it is built without random initialisation, then:

    - every linear with ``weight_scale`` becomes an :class:`NVFP4Linear` holding
      ``dequantize_weight(weight, weight_scale, weight_scale_2)`` in ``dtype`` and fake-quantizing
      its input with ``input_scale``;
    - every other tensor of the model (excluded linears, embeddings, norms: BF16 in the file) is
      copied in, cast to ``dtype``;
    - tensors the class declares ignorable (``_keys_to_ignore_on_load_unexpected``: ``mtp.*`` for
      ``Qwen3_5ForConditionalGeneration``) are skipped; tied weights (``lm_head``) are re-tied;
    - with ``kv_cache_quant_algo`` ``FP8`` and ``fake_quant_kv``, K and V of every non-excluded
      attention module with ``k_proj``/``v_proj`` are fake-quantized to E4M3 (amax = 448 *
      ``k_scale`` / ``v_scale`` when exported, else the constant 448 of "fp8_cast").

    Args:
        export_dir: directory written by ``export_hf_checkpoint`` (``config.json``,
            ``hf_quant_config.json``, ``*.safetensors``, optionally an index file).
        dtype: dtype of the weights and of the computation (float32 compares implementations
            without bf16 rounding).
        fake_quant_kv: emulate the FP8 KV cache; False keeps K/V in ``dtype``.

    Returns:
        :class:`LoadedNVFP4Model` with the eval-mode model and what was read.

    Raises:
        ValueError: a file is missing, ``quant_algo`` is not NVFP4, the KV-cache format is not
            FP8 while ``fake_quant_kv`` is set, or the tensors do not match the model class (the
            message lists every offending tensor or module).
    """
    from transformers.initialization import no_init_weights

    export_dir = Path(export_dir)
    section = read_hf_quant_config(export_dir)
    _check_quant_config(section, export_dir)
    kv_algo = section.get("kv_cache_quant_algo")
    if fake_quant_kv and kv_algo not in (None, "FP8"):
        raise ValueError(
            f"{export_dir}: kv_cache_quant_algo {kv_algo!r} cannot be emulated; only FP8 can. "
            "Pass fake_quant_kv=False to run K/V unquantized."
        )
    exclude_modules = list(section.get("exclude_modules") or [])
    model_cls, config = _model_class_and_config(export_dir)
    tensors = _tensor_index(export_dir)
    with no_init_weights():
        model = model_cls._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    plan = _plan(tensors, model, export_dir)
    missing, tied = _unloaded_keys(model, plan)
    if missing:
        raise ValueError(f"{export_dir}: tensors missing for {type(model).__name__}: {missing}")

    with ExitStack() as stack:
        reader = _TensorReader(tensors, stack)
        state = model.state_dict(keep_vars=True)
        for key in plan.plain:
            state[key].copy_(reader[key])
        for prefix, parts in plan.quantized.items():
            packed, scale, scale_2 = (reader[parts[s]] for s in _NVFP4_SUFFIXES[:3])
            weight = dequantize_weight(packed, scale, scale_2)
            bias = reader[parts["bias"]] if "bias" in parts else None
            layer = NVFP4Linear(weight.to(dtype), reader[parts["input_scale"]], bias)
            parent, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        if tied:
            model.tie_weights()
            param = model.get_parameter
            untied = [t for t, src in tied.items() if param(t) is not param(src)]
            if untied:
                raise ValueError(
                    f"{export_dir}: {untied} are not in the checkpoint and the config does not tie "
                    "them; export them or set tie_word_embeddings"
                )
        kv_fake_quant = bool(fake_quant_kv and kv_algo == "FP8")
        if kv_fake_quant:
            _enable_fp8_kv(model, plan, reader, exclude_modules)

    return LoadedNVFP4Model(
        model=model,
        quant_algo=section["quant_algo"],
        kv_cache_quant_algo=kv_algo,
        kv_cache_fake_quant=kv_fake_quant,
        quantized_modules=tuple(sorted(plan.quantized)),
        exclude_modules=tuple(exclude_modules),
        ignored_keys=tuple(plan.ignored),
    )


def count_quantized(export_dir: str | Path) -> dict[str, int]:
    """Count an export's NVFP4 and high-precision linears and bytes, reading only file headers.

    The model is built on the meta device (no weights in memory) to tell linears from other
    modules.

    Args:
        export_dir: directory written by ``export_hf_checkpoint``.

    Returns:
        ``quantized_linears``: modules stored as NVFP4; ``excluded_linears``: ``nn.Linear`` modules
        of the model stored in high precision (or tied); ``quantized_params``: elements of the
        NVFP4 weights; ``quantized_bytes``: bytes of their weights and scales;
        ``unquantized_bytes``: bytes of every other tensor the model loads; ``ignored_bytes``:
        tensors the class skips (``mtp.*``); ``total_bytes``: all tensors.

    Raises:
        ValueError: as :func:`load_nvfp4_model` for a malformed export.
    """
    export_dir = Path(export_dir)
    _check_quant_config(read_hf_quant_config(export_dir), export_dir)
    model_cls, config = _model_class_and_config(export_dir)
    tensors = _tensor_index(export_dir)
    with torch.device("meta"):
        model = model_cls._from_config(config)
    plan = _plan(tensors, model, export_dir)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    quantized_keys = [k for parts in plan.quantized.values() for k in parts.values()]
    kv_scale_keys = [k for scales in plan.kv_scales.values() for k in scales.values()]
    return {
        "quantized_linears": len(plan.quantized),
        "excluded_linears": sum(1 for name in linears if name not in plan.quantized),
        "quantized_params": sum(2 * tensors[p["weight"]].nbytes for p in plan.quantized.values()),
        "quantized_bytes": sum(tensors[k].nbytes for k in quantized_keys),
        "unquantized_bytes": sum(tensors[k].nbytes for k in (*plan.plain, *kv_scale_keys)),
        "ignored_bytes": sum(tensors[k].nbytes for k in plan.ignored),
        "total_bytes": sum(info.nbytes for info in tensors.values()),
    }
