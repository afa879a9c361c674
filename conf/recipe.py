"""The quantization recipe as data: a format per module group, a weight-scale rule, exclusions, KV cache.

:class:`RecipeSpec` is the ``recipe`` section of a profile (:class:`conf.schema.Profile`) and one
entry of the comparison flow's recipe list. The default is the reference recipe of the public
Qwen3.6-27B NVFP4 release: NVFP4 W4A4 on every language-model linear with max-calibrated
scales, FP8 KV cache, the reference exclusions. Formats (ModelOpt 0.47 export names in brackets):

- ``nvfp4`` (``NVFP4``): E2M1 weights with an E4M3 scale per 16 elements and an FP32
  ``weight_scale_2``, activations NVFP4 with dynamic block scales under a static FP32 ``input_scale``;
- ``nvfp4_w4a16`` (``W4A16_NVFP4``): the same weights, activations left in BF16;
- ``fp8`` (``FP8``): E4M3 weights and activations, one FP32 ``weight_scale`` and ``input_scale`` each;
- ``bf16``: the module is not quantized (it lands in ``exclude_modules``).

Weight-scale rules (ModelOpt ``algorithm``): ``max`` (block scale from the block's max),
``mse`` (per block, the E4M3 scale with the least squared weight error) and ``local_hessian``
(the least ``dwᵀ H dw`` with ``H = ΣxᵀX`` of the block's calibration inputs); NVIDIA's Qwen3.5-9B
table (Model Optimizer 0.47 release notes) loses 5.10 / 3.87 / 3.10 points on average for them.
They change NVFP4 weight scales only; activation scales are always max-calibrated.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from conf.base import FrozenModel

# Modules kept in BF16 by the reference Qwen3.6-27B NVFP4 recipe (model card of the public
# release; NVIDIA Model Optimizer 0.47 ``_default_disabled_quantizer_cfg``). fnmatch patterns over
# module names as they appear in the exported checkpoint (``hf_quant_config.json``
# ``exclude_modules``).
REFERENCE_EXCLUDE_MODULES: tuple[str, ...] = (
    "lm_head",
    "model.visual*",
    "model.language_model.embed_tokens",
    "*linear_attn.conv1d*",
    "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*",
    "mtp.*",
    "*mlp.gate",
    "*shared_expert_gate*",
    "*router*",
)

MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"),
    "attention": ("*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj", "*self_attn.o_proj"),
    "linear_attention": ("*linear_attn.in_proj_qkv", "*linear_attn.in_proj_z", "*linear_attn.out_proj"),
    "lm_head": ("lm_head",),
}
"""Module group -> fnmatch patterns over module names (Llama, Qwen3.5/3.6 naming; Gated DeltaNet
projections under ``linear_attn``). Linears in no group take the ``nvfp4`` format unless excluded."""

QuantFormat = Literal["nvfp4", "nvfp4_w4a16", "fp8", "bf16"]

EXPORT_ALGOS: dict[str, str | None] = {"nvfp4": "NVFP4", "nvfp4_w4a16": "W4A16_NVFP4", "fp8": "FP8", "bf16": None}
"""Format -> ``quant_algo`` that ModelOpt 0.47's export writes for a module of that format."""

BITS_PER_WEIGHT: dict[str, float] = {"nvfp4": 4.5, "nvfp4_w4a16": 4.5, "fp8": 8.0, "bf16": 16.0}
"""Stored bits per weight element: E2M1 plus one E4M3 scale per 16 (4 + 8/16); FP8; BF16."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


class GroupFormats(FrozenModel):
    """The format of each module group (:data:`MODULE_GROUPS`)."""

    mlp: QuantFormat = Field("nvfp4", description="gate_proj, up_proj, down_proj")
    attention: QuantFormat = Field("nvfp4", description="full attention q_proj, k_proj, v_proj, o_proj")
    linear_attention: QuantFormat = Field("nvfp4", description="Gated DeltaNet in_proj_qkv, in_proj_z, out_proj")
    lm_head: Literal["bf16", "nvfp4_w4a16"] = Field("bf16", description=(
        "the output head; its input is never calibrated (calibration runs the decoder alone), so only "
        "weight-only formats"))

    def of(self, group: str) -> str:
        """The format of ``group`` (a key of :data:`MODULE_GROUPS`)."""
        return getattr(self, group)


class RecipeSpec(FrozenModel):
    """The quantization recipe: a format per module group, a weight-scale rule, exclusions, KV cache.

    The defaults are the reference recipe (NVFP4 W4A4 everywhere, max scales, FP8 KV cache).
    """

    name: str = Field("nvfp4-max", description=(
        "lowercase letters, digits, '.', '-'; names the recipe in comparisons (table rows, MLflow child runs)"))
    formats: GroupFormats = GroupFormats()
    weight_scale: Literal["max", "mse", "local_hessian"] = Field("max", description=(
        "how NVFP4 weight block scales are chosen: max of the block, or a search over the E4M3 scales "
        "minimising squared error (mse) or the local-Hessian-weighted error (local_hessian)"))
    fp8_scale_sweep: bool = Field(True, description=(
        "mse / local_hessian: try all 126 E4M3 block scales (ModelOpt's fp8_scale_sweep); false: ModelOpt's "
        "multiplier search of 0.25..4 x the block amax"))
    group_size: Literal[16] = Field(16, description="elements per E4M3 block scale (NVFP4 spec: 16)")
    kv_cache: Literal["fp8_cast", "none"] = Field(
        "fp8_cast", description="fp8_cast: FP8 E4M3 KV cache with constant amax 448, no K/V calibration"
    )
    exclude_modules: tuple[str, ...] = Field(
        REFERENCE_EXCLUDE_MODULES, description="fnmatch patterns of modules kept in BF16"
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"recipe.name {value!r} must be lowercase letters, digits, '.' or '-' "
                             "(it names Prefect artifacts and MLflow runs)")
        return value

    @field_validator("exclude_modules")
    @classmethod
    def _patterns_non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [p for p in value if not p or p != p.strip()]
        if bad:
            raise ValueError(f"recipe.exclude_modules has empty or padded patterns: {bad!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RecipeSpec:
        problems = []
        if self.formats.lm_head != "bf16":
            hiding = [p for p in self.exclude_modules if fnmatch.fnmatchcase("lm_head", p)]
            if hiding:
                problems.append(f"recipe.formats.lm_head is {self.formats.lm_head!r} but exclude_modules "
                                f"{hiding} keeps lm_head in BF16: remove them from recipe.exclude_modules")
        if self.weight_scale != "max" and not self.nvfp4_groups:
            problems.append(f"recipe.weight_scale {self.weight_scale!r} searches NVFP4 block scales but no group "
                            "of recipe.formats is nvfp4 or nvfp4_w4a16: use weight_scale max")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def nvfp4_groups(self) -> tuple[str, ...]:
        """Groups whose weights are NVFP4 (W4A4 or W4A16), in :data:`MODULE_GROUPS` order."""
        return tuple(g for g in MODULE_GROUPS if self.formats.of(g) in ("nvfp4", "nvfp4_w4a16"))

    @property
    def needs_hessian(self) -> bool:
        """Whether the weight-scale search needs per-layer Hessians of calibration inputs."""
        return self.weight_scale == "local_hessian"
