from __future__ import annotations

import re

import pytest

from conf import deep_merge, expand, list_profiles, load_profile
from conf.schema import Profile


@pytest.mark.parametrize("name", list_profiles())
def test_shipped_profile_round_trips(name: str) -> None:
    profile = load_profile(name)
    again = Profile.model_validate_json(profile.model_dump_json())
    assert again == profile, f"profile {name} does not survive a JSON round trip"


def test_shipped_profiles_are_the_expected_three() -> None:
    assert {"demo", "smollm2-nvfp4", "qwen3.6-27b-nvfp4"} <= set(list_profiles())


def test_reference_profile_is_the_reference_recipe() -> None:
    profile = load_profile("qwen3.6-27b-nvfp4")
    assert profile.base.repo_id == "Qwen/Qwen3.6-27B"
    assert profile.image_text.subsets == ("sparsetables", "plotqa_cot", "wiki_en")
    assert profile.image_text.num_samples == 128 and profile.text.num_samples == 128
    assert profile.text.repo_id == "abisee/cnn_dailymail" and profile.text.config == "3.0.0"
    assert profile.recipe.kv_cache == "fp8_cast" and profile.recipe.group_size == 16
    for pattern in ("lm_head", "model.visual*", "mtp.*", "*linear_attn.conv1d*", "*linear_attn.in_proj_a*"):
        assert pattern in profile.recipe.exclude_modules


def test_unknown_key_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"text\.num_sample"):
        load_profile("demo", {"text": {"num_sample": 3}})


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"text\.num_samples"):
        load_profile("demo", {"text": {"num_samples": "many"}})


def test_non_positive_count_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"image_text\.num_samples"):
        load_profile("demo", {"image_text": {"num_samples": 0}})


def test_numeric_revision_from_cli_json_stays_a_string() -> None:
    # `prefect deployment run --param` parses 12345 as JSON: an int must not break the profile.
    profile = load_profile("qwen3.6-27b-nvfp4", {"base": {"revision": 12345}})
    assert profile.base.revision == "12345"
    with pytest.raises(ValueError, match="quote it"):
        load_profile("qwen3.6-27b-nvfp4", {"base": {"revision": 1.234e59}})


def test_file_tracking_store_is_refused() -> None:
    with pytest.raises(ValueError, match="tracking_uri"):
        load_profile("demo", {"tracking_uri": "file:///tmp/mlruns"})


def test_two_base_sources_are_refused() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        load_profile("demo", {"base": {"repo_id": "Qwen/Qwen3.6-27B"}})


def test_bad_name_is_refused() -> None:
    with pytest.raises(ValueError, match="name"):
        load_profile("demo", {"name": "Has Spaces"})


def test_expand_nested_defaults_and_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QD_OUTER", raising=False)
    monkeypatch.setenv("QD_INNER", "/x")
    assert expand("${QD_OUTER:-${QD_INNER}/a}") == "/x/a"
    monkeypatch.delenv("QD_MISSING", raising=False)
    with pytest.raises(ValueError, match="QD_MISSING"):
        expand({"a": ["${QD_MISSING}"]})


def test_deep_merge_overrides_only_leaves() -> None:
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_unknown_profile_lists_shipped_ones() -> None:
    with pytest.raises(ValueError, match="demo"):
        load_profile("no-such-profile")


@pytest.mark.parametrize("written", ["0123456", "0x1f", "1_000", "0o17"])
def test_yaml_revision_that_yaml_1_1_reads_as_a_number_stays_the_text_written(tmp_path, written: str) -> None:
    from conf import profile_path

    text = profile_path("demo").read_text()
    assert "\nbase:\n" in text, "the demo profile's base section moved; adapt this test"
    path = tmp_path / "pinned.yaml"
    path.write_text(text.replace("\nbase:\n", f"\nbase:\n  revision: {written}\n", 1))
    assert load_profile(str(path)).base.revision == written


def test_malformed_yaml_is_one_error_naming_file_line_and_column(tmp_path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nbase: [unclosed\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(broken))}:3:1: not valid YAML \(expected ','"):
        load_profile(str(broken))
