"""Turn a :class:`conf.schema.RecipeSpec` into a ModelOpt ``mtq.quantize`` config.

The config follows NVIDIA Model Optimizer 0.47's list form (``quant_cfg`` entries with
``quantizer_name`` fnmatch patterns, applied in order, later entries winning):

1. ``NVFP4_DEFAULT_CFG``: disable everything, then NVFP4 (E2M1 elements, E4M3 scale per 16
   elements along the reduction dim, FP32 per-tensor scale) on every ``*weight_quantizer`` and
   ``*input_quantizer``, then ModelOpt's default exclusions; ``algorithm`` ``max``.
2. FP8 E4M3 on ``*[kv]_bmm_quantizer`` (``FP8_KV_CFG``); with ``kv_cache="fp8_cast"`` the K/V
   quantizers take ``use_constant_amax`` (amax pinned to 448, not calibrated), as the reference
   release's ``--kv_cache_qformat fp8_cast`` does.
3. The recipe's own ``exclude_modules``, each turned into a quantizer pattern and disabled. Disabled
   quantizers under the vision tower are also given an 8-bit format: ModelOpt's quantized Conv3d
   takes a CUDA-only NVFP4 path whenever its quantizers are NVFP4-typed, even when disabled.
"""

from __future__ import annotations

import copy
from typing import Any

from conf.schema import RecipeSpec

_VISION_PATTERNS = ("*visual*", "*vision_tower*", "*vision_model*")


def quantizer_pattern(module_pattern: str) -> str:
    """Map an ``exclude_modules`` module pattern to a pattern over quantizer names.

    Quantizers are named ``<module>.weight_quantizer`` / ``<module>.input_quantizer``, so an exact
    module name ``lm_head`` becomes ``lm_head.*`` and ``*mlp.gate`` becomes ``*mlp.gate.*`` (which
    does not match ``mlp.gate_proj``); a pattern already ending in ``*`` is kept.
    """
    return module_pattern if module_pattern.endswith("*") else f"{module_pattern}.*"


def build_quant_config(recipe: RecipeSpec) -> dict[str, Any]:
    """Build the ``mtq.quantize`` config for ``recipe``.

    Args:
        recipe: the validated recipe.

    Returns:
        A fresh dict ``{"quant_cfg": [...], "algorithm": "max"}``; safe to mutate.

    Raises:
        ValueError: the recipe asks for a format this ModelOpt version does not provide.
    """
    import modelopt.torch.quantization as mtq  # heavy import: keep module import light

    if recipe.weights != "nvfp4" or recipe.activations != "nvfp4" or recipe.group_size != 16:
        raise ValueError(f"recipe {recipe!r}: only NVFP4 W4A4 with group_size 16 is supported")
    config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    entries: list[dict[str, Any]] = list(config["quant_cfg"])
    if recipe.kv_cache == "fp8_cast":
        for entry in copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]):
            entry.setdefault("cfg", {})["use_constant_amax"] = True
            entries.append(entry)
    for pattern in _VISION_PATTERNS:
        entries.append({"quantizer_name": pattern, "cfg": {"num_bits": 8, "axis": None}, "enable": False})
    for module_pattern in recipe.exclude_modules:
        entries.append({"quantizer_name": quantizer_pattern(module_pattern), "enable": False})
    config["quant_cfg"] = entries
    config["algorithm"] = "max"
    return config
