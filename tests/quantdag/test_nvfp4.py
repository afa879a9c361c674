"""NVFP4 format functions against hand-computed values, ModelOpt's CPU code and a scalar model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantdag.format import nvfp4

F32 = np.float32
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Relative Frobenius error of NVFP4 on Gaussian weights is about 0.096 (E2M1's 1-bit mantissa
# with 16-element blocks); a wrong nibble order or scale convention gives errors near 1 or more.
GAUSSIAN_REL_ERROR_MAX = 0.11


def test_code_table_follows_ocp_e2m1():
    # OCP MX v1.0, E2M1: exponent bias 1, subnormal 0b001 = 0.5, max normal 0b111 = 1.5 * 2**2.
    for code in range(16):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 0b11, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2 ** (exponent - 1)
        expected = -magnitude if sign else magnitude
        assert nvfp4.E2M1_VALUES[code] == expected, f"code {code:04b}"
        assert math.copysign(1, nvfp4.E2M1_VALUES[code]) == (-1 if sign else 1)


def test_pack_and_unpack_known_bytes():
    # 0.5 -> 0x1, 6.0 -> 0x7, -1.0 -> 0xA, 1.5 -> 0x3, -6.0 -> 0xF, -0.5 -> 0x9.
    values = torch.tensor([[0.5, 6.0, -1.0, 1.5], [-6.0, -0.5, 0.0, 4.0]])
    codes = nvfp4.e2m1_codes(values)
    assert codes.tolist() == [[0x1, 0x7, 0xA, 0x3], [0xF, 0x9, 0x0, 0x6]]
    packed = nvfp4.pack_e2m1(codes)
    # Even element in the low nibble, odd element in the high nibble.
    assert packed.tolist() == [[0x71, 0x3A], [0x9F, 0x60]]
    assert torch.equal(nvfp4.unpack_e2m1(packed), values)
    assert nvfp4.unpack_e2m1(torch.tensor([0x8F], dtype=torch.uint8)).tolist() == [-6.0, -0.0]


def test_every_code_pair_round_trips():
    codes = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8).flatten()
    packed = nvfp4.pack_e2m1(codes)
    assert packed.shape == (256,)
    assert sorted(packed.tolist()) == list(range(256)), "each code pair must make a distinct byte"
    table = torch.tensor(nvfp4.E2M1_VALUES)
    assert torch.equal(nvfp4.unpack_e2m1(packed), table[codes.long()])


def test_rounding_ties_go_to_even_codes_and_saturate():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 100.0, -0.25, -0.1, -3.5, 0.26])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.0, -0.0, -4.0, 0.5]
    assert nvfp4.round_to_e2m1(x).tolist() == expected
    # Small negatives keep the sign bit (ModelOpt writes 0x8 for them).
    assert nvfp4.e2m1_codes(torch.tensor([-0.1, 0.1])).tolist() == [0x8, 0x0]


def _weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(96, 256, generator=generator) * 0.02
    outliers = gaussian.clone()
    outliers[::7, ::13] *= 40.0
    with_zero_block = gaussian.clone()
    with_zero_block[5, 32:48] = 0.0
    return {"gaussian": gaussian, "outliers": outliers, "zero_block": with_zero_block}


@pytest.mark.parametrize("name", ["gaussian", "outliers", "zero_block"])
def test_dequantized_weight_error_is_within_one_block_scale(name):
    w = _weights()[name]
    q = nvfp4.quantize_weight(w)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (96, 128)
    assert q.weight_scale.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (96, 16)
    assert q.weight_scale_2.dtype == torch.float32 and q.weight_scale_2.shape == ()
    assert float(q.weight_scale_2) == pytest.approx(float(w.abs().max()) / (6 * 448), rel=1e-6)
    deq = nvfp4.dequantize_weight(q.weight, q.weight_scale, q.weight_scale_2)
    # Half the widest E2M1 gap (4 -> 6) is 1 block scale; a block max that the E4M3 rounding of
    # its scale pushes past 6 (at most 6 / (1 - 2**-4) = 6.4) clips by less than that.
    block_scale = (q.weight_scale.float() * q.weight_scale_2).repeat_interleave(16, dim=-1)
    excess = ((deq - w).abs() - block_scale * (1 + 1e-6)).max().item()
    assert excess <= 0, f"{name}: an element is off by more than its block scale (excess {excess})"
    if name == "gaussian":
        rel = ((deq - w).norm() / w.norm()).item()
        assert rel < GAUSSIAN_REL_ERROR_MAX, f"relative error {rel:.4f} >= {GAUSSIAN_REL_ERROR_MAX}"
    if name == "zero_block":
        assert float(q.weight_scale[5, 2].float()) == 1.0, "an all-zero block stores scale 1.0"
        assert torch.all(deq[5, 32:48] == 0)


def test_quantize_weight_reproduces_modelopt_bytes():
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    for name, w in _weights().items():
        w = w.to(torch.bfloat16)
        packed, scale, scale_2 = NVFP4QTensor.quantize(w.clone(), 16)
        ours = nvfp4.quantize_weight(w)
        assert torch.equal(ours.weight, packed._quantized_data), f"{name}: packed bytes differ"
        assert torch.equal(ours.weight_scale.view(torch.uint8), scale.view(torch.uint8)), name
        assert float(ours.weight_scale_2) == float(scale_2), name
        reference = packed.dequantize(
            dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16}
        )
        deq = nvfp4.dequantize_weight(ours.weight, ours.weight_scale, ours.weight_scale_2)
        assert torch.equal(deq, reference), f"{name}: dequantized values differ"


def _activation_cases() -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with outliers past the calibrated amax (saturation) and an all-zero block."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, 128, generator=generator) * 2.0
    x[0, 0, :16] = 0.0
    x[1, 2, 16:32] *= 50.0
    input_scale = nvfp4.global_scale_from_amax(0.5 * x.abs().max())
    return x, input_scale


def test_fake_quantize_activation_matches_modelopt_cpu_path():
    """ModelOpt's CPU code for NVFP4 is NVFP4QTensor (used by export); with input_scale as its
    global scale it computes the same E4M3 block scales and E2M1 rounding as the GPU kernel,
    except for blocks whose scale underflows (none here; the scalar reference covers those)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    x, input_scale = _activation_cases()
    packed, scale, scale_2 = NVFP4QTensor.quantize(
        x.clone(), 16, weights_scaling_factor_2=input_scale
    )
    reference = packed.dequantize(
        dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16}
    )
    ours = nvfp4.fake_quantize_activation(x, input_scale)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    mismatches = int((ours != reference).sum())
    assert mismatches == 0, f"{mismatches} of {x.numel()} elements differ from ModelOpt"
    saturated = ours[1, 2, 16:32].abs().max().item()
    assert saturated == pytest.approx(6 * 448 * float(input_scale), rel=1e-6), (
        "clips at 6*448*scale"
    )


def _e4m3_round(value: float) -> float:
    """Nearest E4M3 (bias 7, 3 mantissa bits, subnormal step 2**-9), ties to even; value >= 0."""
    if value == 0.0:
        return 0.0
    exponent = max(math.frexp(value)[1] - 1, -6)
    step = 2.0 ** (exponent - 3)
    return round(value / step) * step  # Python's round() is half-to-even


def _e2m1_round(value: float) -> float:
    """Nearest E2M1 magnitude, ties to the even code, saturating; value >= 0."""
    return min(
        E2M1_MAGNITUDES,
        key=lambda m: (abs(m - value), E2M1_MAGNITUDES.index(m) % 2),
    )


def _scalar_reference(x: torch.Tensor, input_scale: float) -> torch.Tensor:
    """ModelOpt's Hopper kernel, one element at a time, float32 arithmetic via numpy scalars."""
    gs = F32(input_scale)
    rows = x.reshape(-1, 16).tolist()
    out = []
    for block in rows:
        amax = F32(max(abs(v) for v in block))
        e4m3 = _e4m3_round(float(min(amax / (F32(6.0) * gs), F32(448.0))))
        scale = F32(e4m3) * gs
        scale = scale if scale >= F32(1e-5) else F32(1.0)
        for v in block:
            magnitude = F32(_e2m1_round(float(F32(abs(v)) / scale))) * scale
            out.append(float(magnitude) if v >= 0 else -float(magnitude))
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


def test_fake_quantize_activation_matches_scalar_reference():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, 64, generator=generator)
    x[1] *= 0.01
    x[2, :16] = 0.0  # zero block -> zeros
    x[3, :16] = torch.linspace(-1e-5, 1e-5, 16)  # scale below 1e-5 -> scale 1.0 -> zeros
    x[4, 16:32] *= 1000.0  # far past the calibrated amax -> E4M3 scale saturates at 448
    x[5, 32:48] = torch.linspace(-1e-4, 1e-4, 16)  # E4M3 block scale 6 * 2**-9 (subnormal)
    input_scale = float(nvfp4.global_scale_from_amax(4.0))
    ours = nvfp4.fake_quantize_activation(x, input_scale)
    reference = _scalar_reference(x, input_scale)
    mismatches = int((ours != reference).sum())
    assert mismatches == 0, f"{mismatches} elements differ from the scalar reference"
    assert torch.all(ours[2, :16] == 0) and torch.all(ours[3, :16] == 0)


def test_fake_quantize_activation_exact_ties():
    # input_scale 2**-8 and block max 6: E4M3 scale 6 / (6 * 2**-8) = 256 exactly, block scale 1.0.
    block = [
        6.0,
        0.25,
        0.75,
        1.25,
        1.75,
        2.5,
        3.5,
        5.0,
        -0.75,
        -2.5,
        -5.0,
        0.1,
        -0.3,
        4.9,
        5.1,
        0.0,
    ]
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -2.0, -4.0, 0.0, -0.5, 4.0, 6.0, 0.0]
    out = nvfp4.fake_quantize_activation(torch.tensor([block]), 2.0**-8)
    assert out[0].tolist() == expected


def test_fake_quantize_e4m3_matches_modelopt_fp8_eager():
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=generator) * 30.0
    x[0, 0] = 1000.0  # saturates at 448 with the constant amax
    for amax in (448.0, 3.0, 250.0):
        reference = fp8_eager(x, torch.tensor(amax))
        ours = nvfp4.fake_quantize_e4m3(x, amax)
        assert torch.equal(ours, reference), f"amax {amax}: differs from ModelOpt's fp8_eager"
    assert float(nvfp4.fake_quantize_e4m3(x)[0, 0]) == 448.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: nvfp4.unpack_e2m1(torch.zeros(4, dtype=torch.int8)), "packed must be uint8"),
        (lambda: nvfp4.pack_e2m1(torch.zeros(3, dtype=torch.uint8)), "even last dimension"),
        (lambda: nvfp4.pack_e2m1(torch.full((2,), 16, dtype=torch.uint8)), "4-bit"),
        (lambda: nvfp4.quantize_weight(torch.zeros(4, 24)), "multiple of block_size=16"),
        (lambda: nvfp4.quantize_weight(torch.zeros(4, 32)), "all zeros: pass weight_scale_2"),
        (
            lambda: nvfp4.quantize_weight(torch.ones(4, 32), -1.0),
            "weight_scale_2 must be finite and > 0",
        ),
        (
            lambda: nvfp4.dequantize_weight(
                torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2).to(torch.float8_e4m3fn), 1.0
            ),
            "do not match",
        ),
        (
            lambda: nvfp4.dequantize_weight(
                torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1), 1.0
            ),
            "weight_scale must be float8_e4m3fn",
        ),
        (lambda: nvfp4.fake_quantize_activation(torch.ones(2, 16), 0.0), "input_scale must be"),
        (lambda: nvfp4.fake_quantize_activation(torch.ones(2, 16), torch.ones(2)), "scalar"),
        (lambda: nvfp4.fake_quantize_activation(torch.ones(2, 8), 1.0), "multiple of block_size"),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="ModelOpt's NVFP4 fake-quant kernel (Triton) needs CUDA capability >= 8.9",
)
def test_fake_quantize_activation_matches_modelopt_kernel_on_gpu():
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    x, _ = _activation_cases()
    x[2, 3, 48:64] = torch.linspace(-1e-5, 1e-5, 16)  # block scale below 1e-5
    amax = (0.5 * x.abs().max()).float()
    input_scale = nvfp4.global_scale_from_amax(amax)  # as export computes it from the amax
    config = QuantizerAttributeConfig(
        num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
    )
    quantizer = TensorQuantizer(config, amax=amax.cuda()).cuda()
    reference = quantizer(x.cuda()).cpu()
    ours = nvfp4.fake_quantize_activation(x, input_scale)
    mismatches = int((ours != reference).sum())
    # The kernel divides with Triton's approximate float32 division: allow a rare tie flipped.
    assert mismatches <= x.numel() // 10_000, f"{mismatches} of {x.numel()} elements differ"
