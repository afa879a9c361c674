"""The CPU stand-ins for ModelOpt's NVFP4 kernels agree with ModelOpt's own reference code and the file format."""

from __future__ import annotations

import pytest
import torch

from quantdag.calibration.cpu_kernels import cpu_nvfp4_kernels, fp8_scale_sweep, static_fp4_fake_quant
from quantdag.format.nvfp4 import dequantize_weight, fake_quantize_activation, quantize_weight


def _weight(seed: int = 0, shape: tuple[int, int] = (32, 64)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * torch.rand(shape[1], generator=generator) * 0.05).to(torch.bfloat16).float()


def _hessian(blocks: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(blocks, 16, 40, generator=generator)
    return x @ x.transpose(-1, -2) / 40


def _reference_sweep(weight: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """ModelOpt 0.47's reference Python sweep (``NVFP4MSECalibrator`` on a CPU tensor: no Triton path)."""
    from modelopt.torch.quantization.calib import NVFP4MSECalibrator
    from modelopt.torch.quantization.model_calib import _LocalHessianAccumulator

    global_amax = weight.abs().max()
    blocks = weight.reshape(-1, 16)
    error_func = None
    if hessian is not None:
        accumulator = _LocalHessianAccumulator(weight.shape[0], weight.shape[1], 16)
        accumulator.hessian_per_block, accumulator.num_samples = hessian.clone(), 1
        error_func = accumulator.build_error_func()
    calibrator = NVFP4MSECalibrator(amax=blocks.abs().amax(-1, keepdim=True), global_amax=global_amax, axis=0,
                                    quant_func=lambda x, amax: static_fp4_fake_quant(x, amax, global_amax),
                                    error_func=error_func)
    calibrator.collect(blocks)
    return calibrator.compute_amax().reshape(-1)


@pytest.mark.parametrize("weighted", [False, True], ids=["mse", "local_hessian"])
def test_block_scale_sweep_equals_modelopts_reference_sweep(weighted: bool) -> None:
    weight = _weight()
    hessian = _hessian(weight.shape[1] // 16) if weighted else None
    fast = fp8_scale_sweep(weight, weight.abs().max(), 16, hessian)
    reference = _reference_sweep(weight, hessian)
    assert fast.shape == (weight.numel() // 16,)
    assert torch.equal(fast, reference), f"{int((fast != reference).sum())} of {fast.numel()} blocks differ"
    assert (fast < weight.reshape(-1, 16).abs().amax(-1) * 0.999).any(), "the search moves some scales off max"


def test_static_fake_quant_with_max_block_amax_is_the_exported_weight() -> None:
    """With block amax = max|block|, the static-block fake quantization is the file's dequantized weight."""
    weight = _weight(seed=3)
    exported = quantize_weight(weight)
    dequantized = dequantize_weight(*exported)
    fake = static_fp4_fake_quant(weight, weight.reshape(-1, 16).abs().amax(-1), weight.abs().max())
    assert torch.equal(fake, dequantized)


def test_modelopt_nvfp4_quantizers_run_on_cpu_only_inside_the_context() -> None:
    import modelopt.torch.kernels.quantization.gemm as kernels
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizer = TensorQuantizer(QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}))
    x = _weight(seed=5, shape=(4, 64))
    quantizer.amax = x.abs().max()
    with pytest.raises(AssertionError, match="CUDA"):
        quantizer(x)
    with cpu_nvfp4_kernels(), cpu_nvfp4_kernels():  # re-entrant
        out = quantizer(x)
    assert torch.equal(out, fake_quantize_activation(x, x.abs().max() / (6 * 448)))
    assert not hasattr(kernels, "nvfp4_fp8_scale_sweep") or torch.cuda.is_available(), "patches are undone on exit"
    with pytest.raises(AssertionError, match="CUDA"):
        quantizer(x)
