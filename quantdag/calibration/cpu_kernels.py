"""Pure-torch stand-ins for ModelOpt 0.47's CUDA/Triton NVFP4 kernels, so weight-scale searches run on the CPU.

ModelOpt's NVFP4 fake quantization and its FP8 block-scale sweep exist only as CUDA or Triton
kernels: on CPU tensors a dynamic-block NVFP4 quantizer fails ("amax must be a CUDA tensor for
dynamic block quantization"), a static-block one fails ("static_blockwise_fp4_fake_quant
requires triton"), and the MSE calibrator falls back to a 126-pass Python sweep over whole
weights. :func:`cpu_nvfp4_kernels` swaps in, for CPU tensors only and while it is active:

- dynamic-block NVFP4 fake quantization (activations): :func:`quantdag.format.nvfp4.fake_quantize_activation`,
  which follows ModelOpt's Hopper kernel ``fp4_fake_quant_block`` (see its docstring);
- static-block NVFP4 fake quantization (weights with searched block amax):
  :func:`static_fp4_fake_quant`, ModelOpt's ``static_blockwise_fp4_fake_quant`` (per-block scale
  ``amax / 6`` cast to E4M3 relative to ``global_amax / (6 * 448)``, E2M1 rounding with ties to
  even, a zero scale giving zeros);
- the FP8 block-scale sweeps ``nvfp4_fp8_scale_sweep`` and ``nvfp4_fp8_scale_sweep_hessian``
  (:func:`fp8_scale_sweep`): for each 16-element block, the one of the 126 positive finite E4M3
  scales (``candidate = e4m3 / 448``, block amax ``candidate * global_amax``) with the least
  squared error, or the least ``dwᵀ H dw`` with the block's local Hessian ``H``; the first
  candidate wins a tie, as in the kernels' strict ``<``.

CUDA tensors always take ModelOpt's own kernels. Everything here is read from
``modelopt/torch/kernels/quantization/gemm/{fp4_kernel,nvfp4_fp8_sweep}.py`` and
``.../common/nvfp4_quant.py`` of nvidia-modelopt 0.47.0.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from quantdag.format.nvfp4 import BLOCK_SIZE, E2M1_MAX, E4M3_MAX, fake_quantize_activation, round_to_e2m1

_SWEEP_ELEMENTS = 1 << 20
"""Elements of the ``[blocks, candidates, 16]`` work tensor per chunk of the sweep (4 MiB in float32: fastest of
2**18, 2**20, 2**22 on 2 CPU cores)."""
_LOCK = threading.RLock()
_DEPTH = 0
_SAVED: list[tuple[Any, str, Any, bool]] = []


def fp8_scale_candidates() -> torch.Tensor:
    """The 126 positive finite E4M3 values divided by 448, ascending: ``float32 [126]`` (ModelOpt's candidate set)."""
    values = torch.arange(0, 128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values) & (values > 0)] / E4M3_MAX


def block_scales(amax: torch.Tensor, global_amax: torch.Tensor, quantize: bool = True,
                 fp8_max: float = E4M3_MAX) -> torch.Tensor:
    """Per-block NVFP4 scales ``amax / 6``, optionally cast to E4M3 relative to the global scale.

    Args:
        amax: per-block amax, any shape, float.
        global_amax: scalar, ``max`` of the tensor (the ``weight_scale_2 * 6 * 448`` of the export).
        quantize: cast each scale to E4M3 relative to ``a = global_amax * (448 / fp8_max) / 6``:
            ``e4m3(clamp(scale * 448 / a, +-448)) * (1 / (448 / a))``, ``a`` <= 2**-24 counting as 1
            (ModelOpt's ``compute_fp4_scales`` through ``fp8_eager``, operation for operation).
        fp8_max: the E4M3 value the largest block scale maps to (448; 256 in ModelOpt's "4 over 6" mode).

    Returns:
        ``float32`` scales of ``amax``'s shape.
    """
    scale = amax.float() / E2M1_MAX
    if not quantize:
        return scale
    fp8_amax = global_amax.float().reshape(()) * (E4M3_MAX / fp8_max) / E2M1_MAX
    fp8_amax = torch.where(fp8_amax <= 1.0 / (1 << 24), torch.ones_like(fp8_amax), fp8_amax)
    multiplier = E4M3_MAX / fp8_amax
    cast = (scale * multiplier).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return cast.float() * (1 / multiplier)


def static_fp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None = None,
                          quantize_block_scales: bool = True, fp8_max: float = E4M3_MAX,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """NVFP4 quantize-dequantize with one stored amax per block (ModelOpt's static-block weights).

    Args:
        x: float tensor; its elements, flattened, form ``amax.numel()`` consecutive blocks.
        amax: per-block amax, ``amax.numel()`` blocks.
        global_amax: scalar per-tensor amax for the E4M3 cast; None: ``amax.max()``.
        quantize_block_scales: cast the block scales to E4M3 (NVFP4) or keep them in float32.
        fp8_max: see :func:`block_scales`.
        out_dtype: result dtype; default ``x.dtype``.

    Returns:
        A tensor of ``x``'s shape: ``sign(x) * round_e2m1(|x| / s) * s`` per block, 0 where the
        block scale ``s`` is 0 (a NaN or infinite scale counts as 1).

    Raises:
        ValueError: ``x.numel()`` is not a multiple of ``amax.numel()``.
    """
    blocks = amax.numel()
    if blocks == 0 or x.numel() % blocks:
        raise ValueError(f"x has {x.numel()} elements, not a multiple of amax's {blocks} blocks")
    global_amax = amax.float().max() if global_amax is None else global_amax
    scale = block_scales(amax.reshape(-1), global_amax, quantize_block_scales, fp8_max).unsqueeze(-1)
    safe = torch.where(torch.isfinite(scale) & (scale != 0), scale, torch.ones_like(scale))
    values = x.float().reshape(blocks, -1)
    magnitude = round_to_e2m1(values.abs() / safe) * safe
    quantized = torch.where(values >= 0, magnitude, -magnitude)
    quantized = torch.where(scale == 0, torch.zeros_like(quantized), quantized)
    return quantized.reshape(x.shape).to(out_dtype or x.dtype)


def fp8_scale_sweep(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = BLOCK_SIZE,
                    hessian: torch.Tensor | None = None) -> torch.Tensor:
    """For each NVFP4 block, the amax of the E4M3 block scale with the least quantization error.

    The error of a block ``w`` quantized with scale ``s`` is ``|dw|²`` (``dw = w - q(w)``), or
    ``dwᵀ H dw`` when ``hessian`` is given (local_hessian). Candidates: :func:`fp8_scale_candidates`
    times ``global_amax``; the scale of a candidate is ``candidate * global_amax / 6`` for the plain
    sweep and its E4M3 cast (:func:`block_scales`) for the Hessian sweep, as in ModelOpt's kernels.

    Args:
        x: weight blocks, any float dtype, ``x.numel()`` a multiple of ``block_size``, row-major
            over ``(out, in / block_size)`` (flat block ``b`` belongs to input block ``b % (in / 16)``).
        global_amax: scalar float, the weight's per-tensor amax.
        block_size: elements per block (16).
        hessian: per-input-block Hessian ``float32 [in / block_size, block_size, block_size]``, or None.

    Returns:
        ``float32 [x.numel() / block_size]``: the chosen block amax.

    Raises:
        ValueError: ``x`` does not split into blocks, or ``hessian`` has the wrong shape.
    """
    if block_size <= 0 or x.numel() % block_size:
        raise ValueError(f"x has {x.numel()} elements, not a multiple of block_size={block_size}")
    weight = x.detach().float().reshape(-1, block_size)
    global_amax = global_amax.detach().float().reshape(()).to(weight.device)
    candidate_amax = fp8_scale_candidates().to(weight.device) * global_amax
    if hessian is None:
        scales = candidate_amax / E2M1_MAX
    else:
        scales = block_scales(candidate_amax, global_amax)
        if hessian.dim() != 3 or tuple(hessian.shape[1:]) != (block_size, block_size) or \
                weight.shape[0] % hessian.shape[0]:
            raise ValueError(f"hessian must be [n_in_blocks, {block_size}, {block_size}] with n_in_blocks dividing "
                             f"{weight.shape[0]} blocks, got {tuple(hessian.shape)}")
        hessian = hessian.detach().float().to(weight.device)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    per_row = 1 if hessian is None else hessian.shape[0]
    rows = max(1, _SWEEP_ELEMENTS // (per_row * scales.numel() * block_size))
    weight = weight.reshape(-1, per_row, block_size)
    best = []
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start:start + rows].unsqueeze(2)  # [R, n, 1, bs]
        magnitude = chunk.abs()
        scaled = scales.view(1, 1, -1, 1)
        error = magnitude - round_to_e2m1(magnitude / scaled) * scaled  # [R, n, K, bs]
        if hessian is None:
            loss = (error * error).sum(-1)
        else:
            error = torch.where(chunk >= 0, error, -error)
            loss = torch.einsum("rnki,nij,rnkj->rnk", error, hessian, error)
        best.append(candidate_amax[loss.argmin(dim=-1)].reshape(-1))
    return torch.cat(best) if best else torch.empty(0)


def _dynamic_block_quant(original: Any) -> Any:
    def dynamic_block_quant(inputs: torch.Tensor, block_size: int, amax: Any, bias: Any, num_bits: Any,
                            scale_bits: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        nvfp4 = tuple(num_bits) == (2, 1) and tuple(scale_bits or ()) == (4, 3)
        if inputs.is_cuda or not nvfp4 or amax is None or bias is not None:
            return original(inputs, block_size, amax, bias, num_bits, scale_bits, *args, **kwargs)
        global_scale = amax.detach().float().max() / (E2M1_MAX * E4M3_MAX)
        return fake_quantize_activation(inputs, global_scale, block_size).to(inputs.dtype)

    return dynamic_block_quant


def _static_fake_quant(original: Any) -> Any:
    def static_blockwise_fp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, global_amax: Any = None,
                                        quantize_block_scales: bool = True, fp8_max: float = E4M3_MAX,
                                        out_dtype: Any = None, *args: Any) -> torch.Tensor:
        if x.is_cuda:
            return original(x, amax, global_amax, quantize_block_scales, fp8_max, out_dtype, *args)
        return static_fp4_fake_quant(x, amax, global_amax, quantize_block_scales, fp8_max, out_dtype)

    return static_blockwise_fp4_fake_quant


def _sweep_eligible(original: Any) -> Any:
    def _triton_sweep_eligible(self: Any, x: torch.Tensor) -> bool:
        if x.is_cuda:
            return original(self, x)
        return self._initial_amax is not None and x.ndim == 2 and x.shape[0] == int(self._initial_amax.numel())

    return _triton_sweep_eligible


def _plain_sweep(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    return fp8_scale_sweep(x, global_amax, block_size)


def _hessian_sweep(x: torch.Tensor, global_amax: torch.Tensor, hessian: torch.Tensor,
                   block_size: int = BLOCK_SIZE) -> torch.Tensor:
    return fp8_scale_sweep(x, global_amax, block_size, hessian)


def _patches() -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, replacement)`` for every ModelOpt name :func:`cpu_nvfp4_kernels` swaps."""
    import modelopt.torch.kernels.quantization.gemm as kernels
    from modelopt.torch.quantization.calib import mse
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    patches = [
        (tensor_quantizer, "dynamic_block_quant", _dynamic_block_quant(tensor_quantizer.dynamic_block_quant)),
        (tensor_quantizer, "static_blockwise_fp4_fake_quant",
         _static_fake_quant(tensor_quantizer.static_blockwise_fp4_fake_quant)),
        (mse.NVFP4MSECalibrator, "_triton_sweep_eligible", _sweep_eligible(mse.NVFP4MSECalibrator._triton_sweep_eligible)),
    ]
    if not hasattr(kernels, "nvfp4_fp8_scale_sweep"):  # no CUDA: ModelOpt did not import its Triton sweeps
        patches += [(kernels, "nvfp4_fp8_scale_sweep", _plain_sweep),
                    (kernels, "nvfp4_fp8_scale_sweep_hessian", _hessian_sweep)]
    return patches


@contextlib.contextmanager
def cpu_nvfp4_kernels() -> Iterator[None]:
    """While active, ModelOpt's NVFP4 quantizers and FP8 block-scale sweeps run on CPU tensors.

    Re-entrant and process-wide (ModelOpt's functions are module globals); CUDA tensors keep
    ModelOpt's kernels. Every name is restored when the outermost block exits.
    """
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            for owner, name, replacement in _patches():
                _SAVED.append((owner, name, owner.__dict__.get(name), name in owner.__dict__))
                setattr(owner, name, replacement)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                while _SAVED:
                    owner, name, value, present = _SAVED.pop()
                    if present:
                        setattr(owner, name, value)
                    else:
                        delattr(owner, name)
