"""NVFP4 as plain torch functions: E2M1 codes, packing, two-level scales, fake quantization.

The format (NVIDIA's NVFP4, "Introducing NVFP4 for Efficient and Accurate Low-Precision
Inference", NVIDIA technical blog, 2025; element type E2M1 from the OCP Microscaling Formats
(MX) Specification v1.0, section 5.3.3):

- Elements are FP4 E2M1: 1 sign bit, 2 exponent bits (bias 1), 1 mantissa bit; magnitudes
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}, no Inf or NaN. The 4-bit code is ``sign << 3 | magnitude index``.
- One FP8 E4M3 (``float8_e4m3fn``) scale per 16 consecutive elements along the reduction
  (last) dimension, and one FP32 per-tensor scale.
- value = E2M1 element * float(E4M3 block scale) * FP32 per-tensor scale.

Conventions of NVIDIA Model Optimizer 0.47's unified Hugging Face export (read from
``modelopt/torch/quantization/qtensor/nvfp4_tensor.py`` and ``modelopt/torch/export``):

- Packing: element ``2i`` goes in the LOW nibble of byte ``i``, element ``2i + 1`` in the HIGH
  nibble, along the last dimension (``weight`` is ``uint8 [out, in / 2]``).
- ``weight_scale_2`` (FP32 scalar) = ``amax(|W|) / (6 * 448)``: a dequantization multiplier, so the
  largest block scale lands at the top of the E4M3 range. ``input_scale`` is the same for the
  calibrated activation amax. llm-compressor (compressed-tensors) stores the reciprocal,
  ``weight_global_scale = 6 * 448 / amax``; do not mix the two.
- ``weight_scale`` (E4M3, ``[out, in / 16]``) = block amax / (6 * weight_scale_2), with an
  all-zero block's scale set to 1.0, then clamped to [2**-9, 448] and cast to E4M3 (round to
  nearest even).
- Elements: ``W / (float(weight_scale) * weight_scale_2)`` rounded to the nearest E2M1 value, ties
  to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
  magnitudes above 6 saturate to 6; the sign bit is set for every negative input, so small
  negatives become code 0x8 (negative zero).

Activations are quantized at run time with dynamic per-block scales; see
:func:`fake_quantize_activation`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK_SIZE = 16
"""Elements per E4M3 block scale (NVFP4 fixes it at 16)."""
E2M1_MAX = 6.0
"""Largest E2M1 magnitude."""
E4M3_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` magnitude."""

E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
"""The value of each 4-bit E2M1 code, indexed by code (bit 3 is the sign)."""

# Round-to-nearest over the 8 magnitudes: the code index is the number of midpoints below |x|.
# A tie between two neighbours goes to the even code (mantissa bit 0), IEEE-style, so a midpoint
# whose lower neighbour has an odd code counts already when |x| equals it.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)

# Below this dequantized block scale, modelopt's Hopper fake-quant kernel uses scale 1.0 instead.
_MIN_ACTIVATION_BLOCK_SCALE = 1e-5


class NVFP4Weight(NamedTuple):
    """A weight in ModelOpt's exported NVFP4 layout.

    Attributes:
        weight: ``uint8 [out, in / 2]``, two E2M1 codes a byte (element ``2i`` in the low nibble).
        weight_scale: ``float8_e4m3fn [out, in / 16]``, one scale per 16-element block.
        weight_scale_2: ``float32 []``, the per-tensor scale (``amax / (6 * 448)``).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor


def global_scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor NVFP4 scale in ModelOpt's convention: ``amax / (6 * 448)``.

    Args:
        amax: absolute maximum of the tensor (weights) or of the calibrated activations.

    Returns:
        ``float32 []``; ``weight_scale_2`` for weights, ``input_scale`` for activations.
    """
    return torch.as_tensor(amax, dtype=torch.float32).reshape(()) / (E2M1_MAX * E4M3_MAX)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value and return its 4-bit code.

    Args:
        x: float tensor of any shape, already divided by its block scale.

    Returns:
        ``uint8`` tensor of ``x``'s shape with codes 0..15: bit 3 is the sign (set for every
        ``x < 0``), bits 0-2 index the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Ties go to the
        even code; magnitudes above 6 saturate to 6. NaN maps to code 0.

    Raises:
        ValueError: ``x`` is not a floating-point tensor.
    """
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    magnitude = x.abs().float()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint, tie_up in zip(_MIDPOINTS, _TIE_ROUNDS_UP, strict=True):
        index += (magnitude >= midpoint) if tie_up else (magnitude > midpoint)
    return ((x < 0).to(torch.uint8) << 3) | index


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even, saturating at +-6).

    Args:
        x: float tensor of any shape, already divided by its block scale.

    Returns:
        ``float32`` tensor of ``x``'s shape holding E2M1 values (``-0.0`` for negatives that round to
        zero, 0 for NaN): the values of :func:`e2m1_codes`, found with one binary search over the
        midpoints (a tie-down midpoint is moved to the next float32 up) instead of seven comparisons.
    """
    magnitude = x.abs().float()
    bounds = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    ties_up = torch.tensor(_TIE_ROUNDS_UP, device=x.device)
    bounds = torch.where(ties_up, bounds, torch.nextafter(bounds, torch.full_like(bounds, float("inf"))))
    values = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=x.device)[torch.bucketize(magnitude, bounds, right=True)]
    values = torch.where(torch.isnan(magnitude), torch.zeros_like(values), values)
    return torch.where(x < 0, -values, values)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 codes two to a byte, ModelOpt's order.

    Args:
        codes: ``uint8 [..., n]`` with values 0..15, ``n`` even.

    Returns:
        ``uint8 [..., n / 2]``: byte ``i`` = ``codes[2i] | codes[2i + 1] << 4``.

    Raises:
        ValueError: ``codes`` is not uint8, holds values above 15, or has an odd last dimension.
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes must have an even last dimension, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes must be 4-bit values (0..15); got a value above 15")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes of two E2M1 codes into their values.

    Args:
        packed: ``uint8 [..., n / 2]``, element ``2i`` in the low nibble of byte ``i`` and element
            ``2i + 1`` in the high nibble (ModelOpt's export order).

    Returns:
        ``float32 [..., n]`` holding E2M1 values (code 0x8 decodes to -0.0).

    Raises:
        ValueError: ``packed`` is not uint8 or is 0-dimensional.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one dimension")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    return table[codes.long()]


def _scalar_scale(scale: torch.Tensor | float, name: str) -> torch.Tensor:
    """A positive finite per-tensor scale as ``float32 []``; ValueError otherwise."""
    tensor = torch.as_tensor(scale, dtype=torch.float32)
    if tensor.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(tensor.shape)}")
    tensor = tensor.reshape(())
    if not bool(torch.isfinite(tensor)) or float(tensor) <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {float(tensor)}")
    return tensor


def _check_blocks(x: torch.Tensor, name: str, block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if x.ndim == 0 or x.shape[-1] % block_size:
        raise ValueError(
            f"{name} last dimension must be a multiple of block_size={block_size}, got shape "
            f"{tuple(x.shape)}; NVFP4 blocks run along the reduction dimension"
        )


def dequantize_weight(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor | float,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Dequantize an exported NVFP4 weight.

    Computes ``e2m1 * (float(weight_scale) * weight_scale_2)`` block by block, in that order
    (ModelOpt's ``NVFP4QTensor.dequantize`` multiplies the two scales first).

    Args:
        weight: ``uint8 [out, in / 2]``, packed E2M1 codes (low nibble = even element).
        weight_scale: ``float8_e4m3fn [out, in / block_size]``, per-block scales.
        weight_scale_2: ``float32`` scalar, per-tensor scale (``amax / (6 * 448)``, ModelOpt's
            convention, not llm-compressor's reciprocal).
        block_size: elements per block scale (16 for NVFP4).

    Returns:
        ``float32 [out, in]``.

    Raises:
        ValueError: a dtype or shape does not match the layout above, or ``weight_scale_2`` is not
            a positive finite scalar.
    """
    if weight.dtype != torch.uint8:
        raise ValueError(f"weight must be uint8 (packed E2M1), got {weight.dtype}")
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    global_scale = _scalar_scale(weight_scale_2, "weight_scale_2").to(weight.device)
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    _check_blocks(weight, "weight (2 elements a byte)", block_size // 2)
    if tuple(weight_scale.shape) != (*weight.shape[:-1], weight.shape[-1] * 2 // block_size):
        raise ValueError(
            f"weight {tuple(weight.shape)} and weight_scale {tuple(weight_scale.shape)} do not "
            f"match: weight_scale must be [..., 2 * weight.shape[-1] / {block_size}]"
        )
    values = unpack_e2m1(weight)
    block_scale = weight_scale.float() * global_scale
    blocks = values.unflatten(-1, (-1, block_size)) * block_scale.unsqueeze(-1)
    return blocks.flatten(-2)


def quantize_weight(
    weight: torch.Tensor,
    weight_scale_2: torch.Tensor | float | None = None,
    block_size: int = BLOCK_SIZE,
) -> NVFP4Weight:
    """Quantize a weight to NVFP4 the way ModelOpt 0.47 exports it.

    Used to build reference checkpoints without ModelOpt. With the same ``weight_scale_2`` it
    reproduces ModelOpt's exported bytes (see the module docstring for the rules).

    Args:
        weight: float ``[..., in]`` (``[out, in]`` for a linear layer), ``in`` a multiple of
            ``block_size``.
        weight_scale_2: per-tensor scale to use; default ``amax(|weight|) / (6 * 448)``. ModelOpt
            passes a shared one for layers it fuses (q/k/v, gate/up).
        block_size: elements per block scale (16 for NVFP4).

    Returns:
        :class:`NVFP4Weight` with ``weight`` ``uint8 [..., in / 2]``, ``weight_scale``
        ``float8_e4m3fn [..., in / block_size]`` and ``weight_scale_2`` ``float32 []``.

    Raises:
        ValueError: ``weight`` is not floating point, its last dimension is not a multiple of
            ``block_size``, it is all zeros (no default global scale), or ``weight_scale_2`` is
            not a positive finite scalar.
    """
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    _check_blocks(weight, "weight", block_size)
    if weight_scale_2 is None:
        amax = weight.abs().max().float()
        if amax == 0:
            raise ValueError("weight is all zeros: pass weight_scale_2 explicitly")
        weight_scale_2 = global_scale_from_amax(amax)
    global_scale = _scalar_scale(weight_scale_2, "weight_scale_2").to(weight.device)
    blocks = weight.float().unflatten(-1, (-1, block_size))
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = block_amax / (E2M1_MAX * global_scale)
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    weight_scale = block_scale.clamp(min=2.0**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
    scaled = blocks / (weight_scale.float() * global_scale).unsqueeze(-1)
    packed = pack_e2m1(e2m1_codes(scaled.flatten(-2)))
    return NVFP4Weight(packed, weight_scale, global_scale)


def fake_quantize_activation(
    x: torch.Tensor,
    input_scale: torch.Tensor | float,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations with dynamic block scales, as ModelOpt does.

    Follows ModelOpt 0.47's fake-quant kernel for Hopper and newer GPUs
    (``fp4_fake_quant_block`` in ``modelopt/torch/kernels/quantization/gemm/fp4_kernel_hopper.py``
    with ``fp8_quantize_scale`` and ``fp4_round_magnitude`` from ``.../common/nvfp4_quant.py``),
    the path ``TensorQuantizer`` takes for a dynamic-block NVFP4 input quantizer:

    1. ``amax_b`` = max |x| over each block of ``block_size`` elements along the last dimension.
    2. E4M3 block scale relative to the static global scale: ``s_b = e4m3(min(amax_b /
       (6 * input_scale), 448)) * input_scale`` (E4M3 cast rounds to nearest even).
    3. A block whose ``s_b`` is below 1e-5 (all-zero blocks, and blocks whose E4M3 scale rounds
       to zero or nearly) uses ``s_b = 1.0``; its elements, far below 0.25, then round to 0.
    4. Elements: ``sign(x) * round_e2m1(|x| / s_b) * s_b`` (ties to even, saturating at 6, so
       values beyond the calibrated amax clip at ``6 * 448 * input_scale``).

    Computed in float32 with exact division. On an H200 it reproduced the kernel bit for bit on
    10.5M float32 and bfloat16 activations (zero, tiny and saturating blocks included). The one
    known difference: the kernel divides with Triton's approximate float32 division, so an
    element whose quotient is exactly an E2M1 midpoint may round either way there (observed:
    down), while here (as in ModelOpt's export and E2M1's round-to-nearest-even) it goes to the
    even code. Such exact ties are rare in activations but common in BF16 weights, which is one
    reason ModelOpt's in-memory fake-quant model differs from its exported file. ModelOpt's
    CUDA-extension path (GPUs below compute capability 8.9) derives the block scale in double
    precision through its reciprocal and has no 1e-5 rule: on the same H200 data it differed in
    the last bits of about a quarter of the elements (relative difference 2e-4).

    Args:
        x: float ``[..., in]``, ``in`` a multiple of ``block_size``.
        input_scale: ``float32`` scalar, the exported ``input_scale`` = calibrated
            ``amax / (6 * 448)``.
        block_size: elements per dynamic block scale (16 for NVFP4).

    Returns:
        ``float32`` tensor of ``x``'s shape.

    Raises:
        ValueError: ``x`` is not floating point, its last dimension is not a multiple of
            ``block_size``, or ``input_scale`` is not a positive finite scalar.
    """
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_blocks(x, "x", block_size)
    global_scale = _scalar_scale(input_scale, "input_scale").to(x.device)
    blocks = x.float().unflatten(-1, (-1, block_size))
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    e4m3_scale = (block_amax / (E2M1_MAX * global_scale)).clamp(max=E4M3_MAX)
    block_scale = e4m3_scale.to(torch.float8_e4m3fn).float() * global_scale
    block_scale = torch.where(
        block_scale >= _MIN_ACTIVATION_BLOCK_SCALE, block_scale, torch.ones_like(block_scale)
    )
    magnitude = round_to_e2m1(blocks.abs() / block_scale) * block_scale
    return torch.where(blocks >= 0, magnitude, -magnitude).flatten(-2)


def fake_quantize_e4m3(x: torch.Tensor, amax: torch.Tensor | float = E4M3_MAX) -> torch.Tensor:
    """Per-tensor FP8 E4M3 quantize-dequantize, as ModelOpt's FP8 KV-cache quantizers do.

    ``x * (448 / amax)``, clamped to +-448, cast to ``float8_e4m3fn`` (nearest even), and scaled
    back (``fp8_eager`` in ``modelopt/torch/quantization/tensor_quant.py``). With the constant amax
    448 of an "fp8_cast" KV cache the scale is 1: a saturating cast to E4M3.

    Args:
        x: float tensor of any shape.
        amax: per-tensor amax; the exported ``k_scale`` / ``v_scale`` times 448.

    Returns:
        ``float32`` tensor of ``x``'s shape.

    Raises:
        ValueError: ``x`` is not floating point or ``amax`` is not a positive finite scalar.
    """
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    amax_t = _scalar_scale(amax, "amax").to(x.device)
    scale = E4M3_MAX / amax_t
    cast = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return cast.float() * (1.0 / scale)
