"""What an export's quantized linears must look like under a recipe: one format per module group.

The audit (``tasks/audit_rules.py``) checks each quantized linear against the format that the
recipe gives its module group (:data:`conf.recipe.MODULE_GROUPS`; a linear in no group is NVFP4),
not against what the export declares, and then checks that the declaration
(``hf_quant_config.json``: one ``quant_algo``, or ``MIXED_PRECISION`` with ``quantized_layers``)
says the same. Formats and their tensors (ModelOpt 0.47's unified HF export):

- ``NVFP4``: ``weight`` U8 ``[out, in/2]``, ``weight_scale`` F8_E4M3 ``[out, in/16]`` (finite, >= 0),
  ``weight_scale_2`` and ``input_scale`` F32 scalars (finite, > 0);
- ``W4A16_NVFP4``: the same without ``input_scale``;
- ``FP8``: ``weight`` F8_E4M3 ``[out, in]`` without NaN codes (0x7F, 0xFF), ``weight_scale`` and
  ``input_scale`` F32 scalars (finite, > 0).

Siblings that vLLM fuses into one weight share per-tensor scalars: NVFP4 ``weight_scale_2`` and
``input_scale``, W4A16 ``weight_scale_2``, FP8 ``input_scale`` only (vLLM keeps one FP8
``weight_scale`` per fused shard and re-scales them; ModelOpt exports them unshared).
"""

from __future__ import annotations

import fnmatch

import torch

from conf.recipe import EXPORT_ALGOS, MODULE_GROUPS, RecipeSpec
from quantdag.format.checkpoint import Checkpoint, TensorInfo
from quantdag.format.layout import layout_problems

SHARED_SCALES: dict[str, tuple[str, ...]] = {
    "NVFP4": ("weight_scale_2", "input_scale"),
    "W4A16_NVFP4": ("weight_scale_2",),
    "FP8": ("input_scale",),
}
"""``quant_algo`` -> the per-tensor scalars that fused siblings must share bit for bit."""

QUANTIZED_LEAVES = ("weight_scale", "weight_scale_2", "input_scale")
"""Tensors only a quantized linear has (an excluded module must carry none)."""


def module_group(module: str) -> str | None:
    """The :data:`conf.recipe.MODULE_GROUPS` group whose pattern ``module`` matches, or None."""
    return next((group for group, patterns in MODULE_GROUPS.items()
                 if any(fnmatch.fnmatchcase(module, p) for p in patterns)), None)


def expected_algo(recipe: RecipeSpec, module: str) -> str | None:
    """The ``quant_algo`` ``recipe`` gives ``module`` (None: BF16): its group's format, NVFP4 in no group."""
    group = module_group(module)
    return EXPORT_ALGOS[recipe.formats.of(group)] if group else "NVFP4"


def linear_problems(algo: str, module: str, params: dict[str, TensorInfo], base: Checkpoint | None) -> list[str]:
    """Dtype/shape problems of one quantized linear of format ``algo``, from the headers only.

    ``out``/``in`` come from the base's weight when the base has it, else from the export's weight
    (``[out, in/2]`` packed for NVFP4 kinds, ``[out, in]`` for FP8).
    """
    weight = params.get("weight")
    base_weight = base.tensors.get(f"{module}.weight") if base is not None else None
    if base_weight is not None and len(base_weight.shape) == 2:
        out_features, in_features = base_weight.shape
    elif weight is not None and len(weight.shape) == 2:
        out_features, in_features = weight.shape[0], weight.shape[1] * (1 if algo == "FP8" else 2)
    else:
        return [f"weight is {weight}, expected a 2-D {algo} weight" if weight else "weight is missing"]
    return layout_problems(algo, out_features, in_features, {k: v for k, v in params.items() if k != "bias"})


def value_problem(algo: str, leaf: str, tensor: torch.Tensor) -> str | None:
    """What is wrong with the values of one stored tensor of a ``algo`` linear, or None.

    Scales must be finite and positive (NVFP4 block scales >= 0: a zero block has scale 0 or 1);
    an FP8 weight must hold no NaN code (E4M3 has no infinity; 0x7F and 0xFF are NaN).
    """
    if leaf == "weight":
        if algo != "FP8":
            return None
        nan = int(((tensor.view(torch.uint8) & 0x7F) == 0x7F).sum())
        return f"weight has {nan} NaN codes (E4M3 0x7F/0xFF)" if nan else None
    values = tensor.float()
    finite = torch.isfinite(values)
    if leaf == "weight_scale" and algo != "FP8":
        bad = int((~finite).sum()) + int((values < 0).sum())
        return f"weight_scale has {bad} non-finite or negative values" if bad else None
    if not bool((finite & (values > 0)).all()):
        return f"{leaf} must be finite and > 0, got {values.flatten()[:4].tolist()}"
    return None


def declared_algo_problems(section: dict, expected: dict[str, str]) -> list[tuple[str, str]]:
    """How ``hf_quant_config.json``'s declaration departs from the formats the recipe gives the export's linears.

    Args:
        section: the ``quantization`` section.
        expected: quantized module -> the ``quant_algo`` the recipe gives it.

    Returns:
        ``(where, message)`` pairs: the top-level ``quant_algo`` must be the one format in use, or
        ``MIXED_PRECISION`` when several are; a mixed export must list every quantized module
        under ``quantized_layers`` with its format (``group_size`` 16 for NVFP4 kinds) and nothing else.
    """
    used = sorted(set(expected.values()))
    want = used[0] if len(used) == 1 else "MIXED_PRECISION"
    declared = section.get("quant_algo")
    problems = []
    if declared != want:
        problems.append(("hf_quant_config.json", f"quantization.quant_algo is {declared!r}, not {want!r}"))
    if want != "MIXED_PRECISION":
        if "NVFP4" in want and section.get("group_size") != 16:
            problems.append(("hf_quant_config.json", f"quantization.group_size is {section.get('group_size')!r}, not 16"))
        return problems
    layers = section.get("quantized_layers") if isinstance(section.get("quantized_layers"), dict) else {}
    for module, algo in sorted(expected.items()):
        entry = layers.get(module)
        got = entry.get("quant_algo") if isinstance(entry, dict) else None
        if got != algo:
            problems.append((module, f"quantized_layers says {got!r}, its tensors and the recipe say {algo!r}"))
        elif "NVFP4" in algo and entry.get("group_size") != 16:
            problems.append((module, f"quantized_layers group_size is {entry.get('group_size')!r}, not 16"))
    problems += [(module, "listed in quantized_layers but has no quantized tensors")
                 for module in sorted(set(layers) - set(expected))]
    return problems
