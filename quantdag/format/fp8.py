"""FP8 E4M3 per-tensor linears of a ModelOpt export (``quant_algo`` ``FP8``), as plain torch.

Layout (ModelOpt 0.47 unified HF export of ``FP8_DEFAULT_CFG``'s ``w8a8_fp8_fp8`` numerics, read
from ``modelopt/torch/export/quant_utils.py``), per linear ``<m>``: ``<m>.weight``
``float8_e4m3fn [out, in]`` = ``e4m3(W / weight_scale)``, ``<m>.weight_scale`` FP32 scalar =
weight amax / 448, ``<m>.input_scale`` FP32 scalar = calibrated activation amax / 448, optional
``<m>.bias``. At run time the activation is quantized per tensor with that static scale:
``e4m3(clamp(x * 448 / amax, +-448)) * amax / 448`` (ModelOpt's ``scaled_e4m3``;
:func:`quantdag.format.nvfp4.fake_quantize_e4m3`).

ModelOpt 0.47 writes the weight as ``(W / weight_scale).to(float8_e4m3fn)`` with ``W`` in BF16 and
a 0-dim FP32 scale, which torch computes in BF16: the quotient is rounded to BF16 before the E4M3
cast, so a few codes sit one E4M3 step away from ModelOpt's own FP8 fake quantization (127 of 4,096
weights of a tiny Llama's ``q_proj``). The file is what gets deployed; this module reads the file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quantdag.format.checkpoint import TensorInfo
from quantdag.format.nvfp4 import E4M3_MAX, _scalar_scale, fake_quantize_e4m3

FP8_SUFFIXES = ("weight", "weight_scale", "input_scale")
"""Tensors every FP8 linear of an export has (``bias`` is optional)."""


def fp8_layout_problems(out_features: int, in_features: int, parts: Mapping[str, TensorInfo]) -> list[str]:
    """How the stored FP8 tensors of an ``[out, in]`` linear depart from ModelOpt's layout.

    Expected: ``weight`` F8_E4M3 ``[out, in]``, ``weight_scale`` and ``input_scale`` F32 scalars
    (``[]`` or ``[1]``). Leaves absent from ``parts`` are not reported.

    Returns:
        One line per problem; empty when the layout fits.
    """
    problems = []
    weight = parts.get("weight")
    if weight is not None and (weight.dtype, weight.shape) != ("F8_E4M3", (out_features, in_features)):
        problems.append(f"weight is {weight}, expected F8_E4M3{[out_features, in_features]}")
    for leaf in ("weight_scale", "input_scale"):
        info = parts.get(leaf)
        if info is not None and (info.dtype != "F32" or info.shape not in ((), (1,))):
            problems.append(f"{leaf} is {info}, expected an F32 scalar")
    return problems


def dequantize_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor | float) -> torch.Tensor:
    """``float32 [out, in]`` = ``float(weight) * weight_scale``.

    Args:
        weight: ``float8_e4m3fn [out, in]``.
        weight_scale: FP32 scalar (weight amax / 448).

    Raises:
        ValueError: ``weight`` is not float8_e4m3fn or ``weight_scale`` is not a positive finite scalar.
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    return weight.float() * _scalar_scale(weight_scale, "weight_scale").to(weight.device)


class FP8Linear(nn.Module):
    """A linear layer of an FP8 export: E4M3 weight with a per-tensor scale, E4M3 fake-quantized input.

    ``forward(x) = F.linear(fake_quantize_e4m3(x, 448 * input_scale), float(weight) * weight_scale, bias)``.

    Attributes:
        weight_fp8: the stored ``float8_e4m3fn [out, in]`` (``packed``), else None.
        weight: the dequantized weight in ``dtype`` (not ``packed``), else None.
        weight_scale, input_scale: FP32 scalar buffers, as exported.
        bias: optional ``[out]`` in ``dtype``.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, packed: bool = False) -> None:
        """Wrap the exported tensors; ``packed`` keeps the 1-byte weight and dequantizes per forward.

        Raises:
            ValueError: ``weight`` is not a 2-D float8_e4m3fn tensor, or a scale is not a positive finite scalar.
        """
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"weight must be [out, in], got {tuple(weight.shape)}")
        dense = dequantize_fp8_weight(weight, weight_scale)
        _scalar_scale(input_scale, "input_scale")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(()).clone())
        self.register_buffer("input_scale", input_scale.detach().float().reshape(()).clone())
        self.register_buffer("weight_fp8", weight if packed else None)
        self.weight = None if packed else nn.Parameter(dense.to(dtype), requires_grad=False)
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` -> ``[..., out]`` in ``dtype``."""
        weight = self.weight if self.weight is not None else dequantize_fp8_weight(self.weight_fp8, self.weight_scale)
        quantized = fake_quantize_e4m3(x, self.input_scale * E4M3_MAX)
        return F.linear(quantized.to(self.dtype), weight.to(self.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per tensor, "
                f"input_scale={float(self.input_scale):.3e}")
