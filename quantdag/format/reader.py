"""Read a ModelOpt NVFP4 Hugging Face export back into a runnable CPU model.

ModelOpt's own NVFP4 fake quantization needs CUDA, so on the CPU the project evaluates the
exported FILES: :func:`load_nvfp4_model` builds the transformers model from the export's
``config.json``, dequantizes every NVFP4 linear layer into an :class:`NVFP4Linear` (which
fake-quantizes its input at run time with the stored ``input_scale``; a ``W4A16_NVFP4`` layer
has none and leaves its input as is), every FP8 linear into a
:class:`quantdag.format.fp8.FP8Linear` (E4M3 input with a static per-tensor scale), loads the
excluded layers in high precision, and optionally fake-quantizes the FP8 KV cache. A
``MIXED_PRECISION`` export gives each layer its own format (``quantized_layers``). The format itself
lives in :mod:`quantdag.format.nvfp4`, the files are read through :mod:`quantdag.format.checkpoint`,
their NVFP4 layout is checked by :mod:`quantdag.format.layout`, and the KV-cache emulation is
:mod:`quantdag.format.fp8_kv`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantdag.format.checkpoint import Checkpoint
from quantdag.format.fp8 import FP8Linear
from quantdag.format.fp8_kv import enable_fp8_kv
from quantdag.format.layout import (
    NVFP4_SUFFIXES,
    check_quant_config,
    model_class_and_config,
    plan_tensors,
    unloaded_keys,
)
from quantdag.format.nvfp4 import BLOCK_SIZE, dequantize_weight, fake_quantize_activation

__all__ = [
    "LoadedNVFP4Model",
    "NVFP4Linear",
    "PackedNVFP4Linear",
    "count_quantized",
    "load_nvfp4_model",
]


class NVFP4Linear(nn.Linear):
    """A linear layer of an NVFP4 export: dequantized weight, NVFP4 fake-quantized input.

    ``forward(x) = F.linear(fake_quantize_activation(x, input_scale), weight, bias)``, so the
    activations see the same dynamic per-16 E4M3 block scales and E2M1 rounding that NVFP4
    W4A4 inference applies; without ``input_scale`` (W4A16) ``x`` is used as it is.

    Attributes:
        weight: dequantized weight, ``[out, in]`` in the model dtype (not trainable).
        bias: optional ``[out]``.
        input_scale: ``float32 []`` buffer, the exported ``input_scale`` (amax / (6 * 448)), or
            None for a weight-only (W4A16) layer.
        block_size: activation block size (16).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        input_scale: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        """Wrap an already dequantized weight.

        Args:
            weight: float ``[out, in]``, ``in`` a multiple of ``block_size``.
            input_scale: float32 scalar, the exported activation scale; None: activations unquantized.
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
        self.register_buffer("input_scale", _scale_buffer(input_scale))
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            x: ``[..., in]`` activations.

        Returns:
            ``[..., out]`` in the weight's dtype.
        """
        quantized = x if self.input_scale is None else fake_quantize_activation(x, self.input_scale, self.block_size)
        return F.linear(quantized.to(self.weight.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.input_scale)}"


def _scale_buffer(scale: torch.Tensor | None) -> torch.Tensor | None:
    return None if scale is None else scale.detach().float().reshape(()).clone()


def _describe(input_scale: torch.Tensor | None) -> str:
    return "nvfp4 W4A16" if input_scale is None else f"nvfp4 W4A4, input_scale={float(input_scale):.3e}"


class PackedNVFP4Linear(nn.Module):
    """An :class:`NVFP4Linear` that keeps the export's packed weight and dequantizes it per forward.

    Holds what the file holds (``uint8 [out, in/2]`` E2M1 codes, ``float8_e4m3fn [out, in/16]``
    block scales, the FP32 ``weight_scale_2``): about 0.56 bytes a weight instead of 2 (BF16), so
    a 27B export runs in the memory of its file. Each forward dequantizes into ``dtype`` (one
    layer's weight at a time) and computes exactly what :class:`NVFP4Linear` computes.

    Attributes:
        weight_packed, weight_scale, weight_scale_2, input_scale: the exported tensors (buffers).
        bias: optional ``[out]`` in ``dtype``.
    """

    def __init__(self, packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                 input_scale: torch.Tensor | None, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 block_size: int = BLOCK_SIZE) -> None:
        """Keep the packed tensors; ``dtype`` is the compute dtype of the dequantized weight.

        Raises:
            ValueError: the tensors do not have the NVFP4 layout (checked by one dequantization).
        """
        super().__init__()
        dequantize_weight(packed[:1], weight_scale[:1], weight_scale_2, block_size)  # layout check, one row
        self.in_features, self.out_features = packed.shape[1] * 2, packed.shape[0]
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_scale_2", weight_scale_2.detach().float().reshape(()).clone())
        self.register_buffer("input_scale", _scale_buffer(input_scale))
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        self.dtype, self.block_size = dtype, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` -> ``[..., out]`` in ``dtype``, as :meth:`NVFP4Linear.forward`."""
        weight = dequantize_weight(self.weight_packed, self.weight_scale, self.weight_scale_2, self.block_size)
        quantized = x if self.input_scale is None else fake_quantize_activation(x, self.input_scale, self.block_size)
        return F.linear(quantized.to(self.dtype), weight.to(self.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {_describe(self.input_scale)}"


@dataclass(frozen=True)
class LoadedNVFP4Model:
    """What :func:`load_nvfp4_model` returns.

    Attributes:
        model: the transformers model in eval mode, quantized linears as :class:`NVFP4Linear`
            (or :class:`PackedNVFP4Linear`) and :class:`quantdag.format.fp8.FP8Linear`.
        quant_algo: ``hf_quant_config.json`` ``quant_algo`` (``NVFP4``, ``W4A16_NVFP4``, ``FP8``,
            ``MIXED_PRECISION``).
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


@torch.no_grad()
def load_nvfp4_model(
    export_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    fake_quant_kv: bool = True,
    device: str | torch.device = "cpu",
    packed: bool = False,
) -> LoadedNVFP4Model:
    """Load a ModelOpt NVFP4 export as a transformers model that runs on the CPU.

    The model class is ``config.json``'s ``architectures[0]`` (``quantization_config`` is dropped so
    transformers attaches no quantizer); it is built without random initialisation, then:

    - every NVFP4 linear (``weight_scale`` and ``weight_scale_2``) becomes an :class:`NVFP4Linear`
      holding ``dequantize_weight(weight, weight_scale, weight_scale_2)`` in ``dtype`` and
      fake-quantizing its input with ``input_scale`` (none for ``W4A16_NVFP4``); every FP8 linear an
      :class:`quantdag.format.fp8.FP8Linear`;
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
        device: where the model is built and the weights are dequantized (a CUDA device skips
            the host-side dequantization, minutes for a large checkpoint).
        packed: keep quantized linears packed as in the file (:class:`PackedNVFP4Linear`,
            dequantized per forward) instead of dequantized (:class:`NVFP4Linear`); same outputs,
            a quarter of the weight memory.

    Returns:
        :class:`LoadedNVFP4Model` with the eval-mode model and what was read.

    Raises:
        ValueError: a file is missing, ``quant_algo`` is not a format of :mod:`quantdag.format.layout`, the KV-cache format is not
            FP8 while ``fake_quant_kv`` is set, or the tensors do not match the model class (the
            message lists every offending tensor or module).
    """
    from accelerate.utils import set_module_tensor_to_device
    from transformers.initialization import no_init_weights

    export_dir = Path(export_dir)
    checkpoint = Checkpoint(export_dir)
    section = check_quant_config(checkpoint)
    kv_algo = section.get("kv_cache_quant_algo")
    if fake_quant_kv and kv_algo not in (None, "FP8"):
        raise ValueError(
            f"{export_dir}: kv_cache_quant_algo {kv_algo!r} cannot be emulated; only FP8 can. "
            "Pass fake_quant_kv=False to run K/V unquantized."
        )
    exclude_modules = list(section.get("exclude_modules") or [])
    model_cls, config = model_class_and_config(export_dir)
    checkpoint.tensors  # every header read (and checked) before the model is built
    device = torch.device(device)
    if packed:  # parameters on meta until read: the full-precision linears are never allocated
        from accelerate import init_empty_weights

        with no_init_weights(), init_empty_weights(include_buffers=False):
            model = model_cls._from_config(config, dtype=dtype)
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
    else:
        with no_init_weights(), device:
            model = model_cls._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    plan = plan_tensors(checkpoint, model)
    missing, tied = unloaded_keys(model, plan)
    if missing:
        raise ValueError(f"{export_dir}: tensors missing for {type(model).__name__}: {missing}")

    with checkpoint.reader() as reader:
        state = model.state_dict(keep_vars=True)
        for key in plan.plain:
            if state[key].device.type == "meta":
                set_module_tensor_to_device(model, key, device, value=reader[key], dtype=state[key].dtype)
            else:
                state[key].copy_(reader[key])
        for prefix, parts in plan.quantized.items():
            bias = reader[parts["bias"]].to(device) if "bias" in parts else None
            input_scale = reader[parts["input_scale"]].to(device) if "input_scale" in parts else None
            if plan.algos[prefix] == "FP8":
                weight, scale = (reader[parts[s]].to(device) for s in ("weight", "weight_scale"))
                layer = FP8Linear(weight, scale, input_scale, bias, dtype, packed=packed)
            elif packed:
                codes, scale, scale_2 = (reader[parts[s]].to(device) for s in NVFP4_SUFFIXES[:3])
                layer = PackedNVFP4Linear(codes, scale, scale_2, input_scale, bias, dtype)
            else:
                codes, scale, scale_2 = (reader[parts[s]].to(device) for s in NVFP4_SUFFIXES[:3])
                layer = NVFP4Linear(dequantize_weight(codes, scale, scale_2).to(dtype), input_scale, bias)
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
            enable_fp8_kv(model, plan, reader, exclude_modules)

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
    """Count an export's quantized (NVFP4, FP8) and high-precision linears and bytes, reading only file headers.

    The model is built on the meta device (no weights in memory) to tell linears from other
    modules.

    Args:
        export_dir: directory written by ``export_hf_checkpoint``.

    Returns:
        ``quantized_linears``: modules stored quantized; ``excluded_linears``: ``nn.Linear`` modules
        of the model stored in high precision (or tied); ``quantized_params``: elements of the
        quantized weights; ``quantized_bytes``: bytes of their weights and scales;
        ``unquantized_bytes``: bytes of every other tensor the model loads; ``ignored_bytes``:
        tensors the class skips (``mtp.*``); ``total_bytes``: all tensors.

    Raises:
        ValueError: as :func:`load_nvfp4_model` for a malformed export.
    """
    export_dir = Path(export_dir)
    checkpoint = Checkpoint(export_dir)
    check_quant_config(checkpoint)
    model_cls, config = model_class_and_config(export_dir)
    tensors = checkpoint.tensors
    with torch.device("meta"):
        model = model_cls._from_config(config)
    plan = plan_tensors(checkpoint, model)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    quantized_keys = [k for parts in plan.quantized.values() for k in parts.values()]
    kv_scale_keys = [k for scales in plan.kv_scales.values() for k in scales.values()]
    return {
        "quantized_linears": len(plan.quantized),
        "excluded_linears": sum(1 for name in linears if name not in plan.quantized),
        "quantized_params": sum((1 if plan.algos[m] == "FP8" else 2) * tensors[p["weight"]].nbytes
                                for m, p in plan.quantized.items()),
        "quantized_bytes": sum(tensors[k].nbytes for k in quantized_keys),
        "unquantized_bytes": sum(tensors[k].nbytes for k in (*plan.plain, *kv_scale_keys)),
        "ignored_bytes": sum(tensors[k].nbytes for k in plan.ignored),
        "total_bytes": sum(info.nbytes for info in tensors.values()),
    }
