"""FP8 KV-cache emulation on the CPU: fake-quantize K and V to E4M3 inside attention.

:func:`enable_fp8_kv` gives every non-excluded attention module with ``k_proj``/``v_proj`` the
amax of its K and V (448 * the exported ``k_scale`` / ``v_scale``, else the constant 448 of
"fp8_cast") and switches the model to an attention function that fake-quantizes K and V before
running the original one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from torch import nn

from quantdag.format.checkpoint import TensorReader
from quantdag.format.layout import Plan
from quantdag.format.nvfp4 import E4M3_MAX, fake_quantize_e4m3

_FP8_KV_ATTENTION_PREFIX = "fp8_kv_"


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


def enable_fp8_kv(
    model: nn.Module, plan: Plan, reader: TensorReader, exclude_modules: list[str]
) -> None:
    """Make ``model``'s attention fake-quantize K and V to E4M3 from now on.

    Args:
        model: a transformers model (its ``config._attn_implementation`` is the base, ``sdpa``
            when unset).
        plan: the export's tensors; ``plan.kv_scales`` names each module's ``k_scale`` /
            ``v_scale``.
        reader: reads those scales (float32 scalars).
        exclude_modules: ``exclude_modules`` patterns of the export; matching modules keep K/V
            unquantized.

    Raises:
        ValueError: the base attention implementation is not registered with transformers.
    """
    for name, module in _iter_kv_attention_modules(model, exclude_modules):
        scales = plan.kv_scales.get(name, {})
        module.fp8_kv_amax = tuple(
            float(reader[scales[i]].float().reshape(())) * E4M3_MAX if i in scales else E4M3_MAX
            for i in (0, 1)
        )
    base = model.config._attn_implementation or "sdpa"
    if not base.startswith(_FP8_KV_ATTENTION_PREFIX):
        model.set_attn_implementation(_fp8_kv_attention(base))
