"""The recipe as data: defaults, formats per module group, and one clear error per bad input."""

from __future__ import annotations

import pytest

from conf import load_profile
from conf.recipe import MODULE_GROUPS, GroupFormats, RecipeSpec


def test_default_recipe_is_the_reference_recipe() -> None:
    recipe = RecipeSpec()
    assert recipe.formats == GroupFormats(mlp="nvfp4", attention="nvfp4", linear_attention="nvfp4", lm_head="bf16")
    assert (recipe.weight_scale, recipe.kv_cache, recipe.group_size) == ("max", "fp8_cast", 16)
    assert recipe.nvfp4_groups == ("mlp", "attention", "linear_attention") and not recipe.needs_hessian
    assert set(MODULE_GROUPS) == {"mlp", "attention", "linear_attention", "lm_head"}


def test_profile_recipe_section_takes_formats_and_weight_scale() -> None:
    profile = load_profile("smollm2-nvfp4", {"recipe": {
        "name": "mlp-nvfp4-attention-fp8", "formats": {"attention": "fp8", "linear_attention": "fp8"},
        "weight_scale": "local_hessian"}})
    assert profile.recipe.formats.of("attention") == "fp8" and profile.recipe.formats.mlp == "nvfp4"
    assert profile.recipe.needs_hessian


@pytest.mark.parametrize(("recipe", "field"), [
    ({"formats": {"mlp": "int4"}}, "recipe.formats.mlp"),
    ({"formats": {"lm_head": "nvfp4"}}, "recipe.formats.lm_head"),
    ({"weight_scale": "gptq"}, "recipe.weight_scale"),
    ({"name": "Has Spaces"}, "recipe.name"),
    ({"formats": {"mlp": "bf16", "attention": "fp8", "linear_attention": "bf16"}, "weight_scale": "mse"}, "weight_scale"),
    ({"formats": {"lm_head": "nvfp4_w4a16"}}, "remove them from recipe.exclude_modules"),
])
def test_bad_recipe_names_the_field_and_the_fix(recipe: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_profile("demo", {"recipe": recipe})


def test_weight_only_lm_head_needs_lm_head_out_of_the_exclusions() -> None:
    excluded = [p for p in RecipeSpec().exclude_modules if p != "lm_head"]
    recipe = RecipeSpec(formats=GroupFormats(lm_head="nvfp4_w4a16"), exclude_modules=excluded)
    assert recipe.formats.lm_head == "nvfp4_w4a16"
