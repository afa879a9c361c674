"""Turn a :class:`conf.schema.RecipeSpec` into a ModelOpt ``mtq.quantize`` config.

The config follows NVIDIA Model Optimizer 0.47's list form (``quant_cfg`` entries with
``quantizer_name`` fnmatch patterns, applied in order, later entries winning):

1. ``NVFP4_DEFAULT_CFG``: disable everything, then NVFP4 (E2M1 elements, E4M3 scale per 16
   elements along the reduction dim, FP32 per-tensor scale) on every ``*weight_quantizer`` and
   ``*input_quantizer``, then ModelOpt's default exclusions; ``algorithm`` ``max``. With
   ``weight_scale`` ``mse`` or ``local_hessian`` the weight entry takes ModelOpt's static block
   type (``nvfp4_static``: one stored amax per block, as in ``NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG``
   and ``NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG``) and ``algorithm`` becomes that method.
2. Module groups (:data:`conf.recipe.MODULE_GROUPS`) whose format is not ``nvfp4``, placed before
   ModelOpt's default exclusions so those still win: ``nvfp4_w4a16`` disables the group's input
   quantizers, ``fp8`` gives weight and input quantizers FP8 E4M3 per tensor (``FP8_DEFAULT_CFG``'s
   ``w8a8_fp8_fp8``), ``bf16`` disables both. A weight-only ``lm_head`` comes after them (ModelOpt
   disables ``*lm_head*`` by default).
3. FP8 E4M3 on ``*[kv]_bmm_quantizer`` (``FP8_KV_CFG``); with ``kv_cache="fp8_cast"`` the K/V
   quantizers take ``use_constant_amax`` (amax pinned to 448, not calibrated), as the reference
   release's ``--kv_cache_qformat fp8_cast`` does.
4. The recipe's own ``exclude_modules``, each turned into a quantizer pattern and disabled. Disabled
   quantizers under the vision tower are also given an 8-bit format: ModelOpt's quantized Conv3d
   takes a CUDA-only NVFP4 path whenever its quantizers are NVFP4-typed, even when disabled.

The default recipe adds nothing to step 2 and keeps ``max``: its config is the one every earlier
release of the project used, entry for entry (``tests/quantdag/calibration/test_recipe.py``).

Max calibration never quantizes while it collects (ModelOpt's ``enable_stats_collection`` turns
fake quantization off), so an input quantizer's amax is the max of the BF16 activations whatever
the formats: :func:`calibration_recipe` is the one calibration that serves a list of recipes.
"""


from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from conf.recipe import EXPORT_ALGOS, MODULE_GROUPS, GroupFormats, RecipeSpec

_VISION_PATTERNS = ("*visual*", "*vision_tower*", "*vision_model*")


def quantizer_pattern(module_pattern: str) -> str:
    """Map an ``exclude_modules`` module pattern to a pattern over quantizer names.

    Quantizers are named ``<module>.weight_quantizer`` / ``<module>.input_quantizer``, so an exact
    module name ``lm_head`` becomes ``lm_head.*`` and ``*mlp.gate`` becomes ``*mlp.gate.*`` (which
    does not match ``mlp.gate_proj``); a pattern already ending in ``*`` is kept.
    """
    return module_pattern if module_pattern.endswith("*") else f"{module_pattern}.*"


def build_quant_config(recipe: RecipeSpec) -> dict[str, Any]:
    """Build the ``mtq.quantize`` config for ``recipe`` (see the module docstring for the entries).

    Args:
        recipe: the validated recipe.

    Returns:
        A fresh dict ``{"quant_cfg": [...], "algorithm": ...}``; safe to mutate. ``algorithm`` is
        ``"max"``, or ``{"method": "mse" | "local_hessian", "fp8_scale_sweep": bool}``.

    Raises:
        ValueError: the recipe asks for a group size this ModelOpt version does not provide.
    """
    import modelopt.torch.quantization as mtq  # heavy import: keep module import light

    if recipe.group_size != 16:
        raise ValueError(f"recipe.group_size {recipe.group_size}: NVFP4 has 16-element blocks")
    config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    entries: list[dict[str, Any]] = list(config["quant_cfg"])
    weight_at = next(i for i, e in enumerate(entries) if e.get("quantizer_name") == "*weight_quantizer")
    input_at = next(i for i, e in enumerate(entries) if e.get("quantizer_name") == "*input_quantizer")
    if recipe.weight_scale != "max":
        entries[weight_at] = {"quantizer_name": "*weight_quantizer", "cfg": static_nvfp4(entries[weight_at]["cfg"])}
    weight_cfg = entries[weight_at]["cfg"]
    groups = [entry for group in MODULE_GROUPS if group != "lm_head"
              for entry in group_entries(group, recipe.formats.of(group), weight_cfg)]
    entries[input_at + 1:input_at + 1] = groups
    entries += group_entries("lm_head", recipe.formats.lm_head, weight_cfg)
    if recipe.kv_cache == "fp8_cast":
        for entry in copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"]):
            entry.setdefault("cfg", {})["use_constant_amax"] = True
            entries.append(entry)
    for pattern in _VISION_PATTERNS:
        entries.append({"quantizer_name": pattern, "cfg": {"num_bits": 8, "axis": None}, "enable": False})
    for module_pattern in recipe.exclude_modules:
        entries.append({"quantizer_name": quantizer_pattern(module_pattern), "enable": False})
    config["quant_cfg"] = entries
    config["algorithm"] = ("max" if recipe.weight_scale == "max"
                           else {"method": recipe.weight_scale, "fp8_scale_sweep": recipe.fp8_scale_sweep})
    return config


def static_nvfp4(weight_cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelOpt's ``nvfp4_static`` weight attributes: ``weight_cfg`` with block type ``static``.

    A static-block weight quantizer stores one amax per 16-element block, which a weight-scale
    search (``mse``, ``local_hessian``) chooses; ModelOpt exports it like any NVFP4 weight.
    """
    cfg = copy.deepcopy(weight_cfg)
    cfg["block_sizes"] = {**cfg["block_sizes"], "type": "static"}
    return cfg


FP8_PER_TENSOR: dict[str, Any] = {"num_bits": (4, 3), "axis": None}
"""FP8 E4M3, one amax per tensor (ModelOpt's ``configs/numerics/fp8``)."""


def group_entries(group: str, fmt: str, weight_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """``quant_cfg`` entries that give module group ``group`` the format ``fmt``.

    Args:
        group: a key of :data:`conf.recipe.MODULE_GROUPS`.
        fmt: ``nvfp4``, ``nvfp4_w4a16``, ``fp8`` or ``bf16``.
        weight_cfg: the recipe's NVFP4 weight attributes (dynamic or static blocks).

    Returns:
        Entries over ``<module pattern>.weight_quantizer`` / ``.input_quantizer``; none for an
        ``nvfp4`` group other than ``lm_head`` (the global entries already make it NVFP4 W4A4).

    Raises:
        ValueError: an unknown group or format.
    """
    if group not in MODULE_GROUPS or fmt not in EXPORT_ALGOS:
        raise ValueError(f"unknown module group {group!r} or format {fmt!r}: groups {sorted(MODULE_GROUPS)}, "
                         f"formats {sorted(EXPORT_ALGOS)}")
    if group == "lm_head":  # ModelOpt disables *lm_head* by default: only a weight-only format re-enables it
        return [] if fmt == "bf16" else [{"quantizer_name": f"{p}.weight_quantizer", "cfg": copy.deepcopy(weight_cfg),
                                          "enable": True} for p in MODULE_GROUPS[group]]
    cfg_of = {"nvfp4": None, "fp8": (FP8_PER_TENSOR, FP8_PER_TENSOR), "nvfp4_w4a16": (weight_cfg, False),
              "bf16": (False, False)}[fmt]
    entries = []
    for pattern in MODULE_GROUPS[group] if cfg_of else ():
        for leaf, cfg in zip(("weight_quantizer", "input_quantizer"), cfg_of):
            name = f"{pattern}.{leaf}"
            entries.append({"quantizer_name": name, "enable": False} if cfg is False
                           else {"quantizer_name": name, "cfg": copy.deepcopy(cfg), "enable": True})
    return entries


def calibration_recipe(recipes: Sequence[RecipeSpec]) -> RecipeSpec:
    """The one max-calibrated recipe whose input amax serve every recipe in ``recipes``.

    Max calibration collects BF16 activations with fake quantization off, so an input amax does not
    depend on the formats, the weight-scale rule or the KV cache: the calibration recipe is the
    default recipe with only the exclusions that every recipe shares (a module that one recipe
    quantizes is calibrated). For ``[RecipeSpec()]`` it is ``RecipeSpec()`` itself, so a
    comparison and a quantize run of the default recipe share the calibration's cache entry.

    Raises:
        ValueError: ``recipes`` is empty.
    """
    if not recipes:
        raise ValueError("calibration_recipe: no recipe given")
    shared = tuple(p for p in recipes[0].exclude_modules if all(p in r.exclude_modules for r in recipes[1:]))
    return RecipeSpec(exclude_modules=shared)


def calibrates_directly(recipe: RecipeSpec) -> bool:
    """Whether ``recipe``'s own max calibration gives its export (NVFP4 W4A4 everywhere, max weight scales).

    Any other recipe takes its quantizer state from a weight-scale step over the calibration of
    :func:`calibration_recipe` (``tasks/weight_scales.py``).
    """
    return recipe.weight_scale == "max" and recipe.formats == GroupFormats()


def exports_calibration(recipe: RecipeSpec, calibration: RecipeSpec) -> bool:
    """Whether ``recipe`` exports the merged state of a max calibration with ``calibration`` as it is.

    True when the two differ in name alone (same formats, weight scales, exclusions, KV cache) and
    the recipe calibrates directly; otherwise the recipe's own quantizers must be inserted over
    the shared input amax (``tasks/weight_scales.py``), or its export would carry the calibration
    recipe's KV cache and exclusions.
    """
    return calibrates_directly(recipe) and recipe.model_copy(update={"name": calibration.name}) == calibration
