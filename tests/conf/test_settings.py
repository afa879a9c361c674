"""``conf.settings``: every ``QUANTDAG_*`` knob typed, bounded, documented and read through one model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conf.settings import Settings, SettingsError, settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``QUANTDAG_*`` knob set in this process (restored after the test)."""
    for name in Settings.variables():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("HOME", str(tmp_path))
    knobs = settings()
    assert knobs == Settings() == Settings.from_env({})
    assert knobs.task_retries is None, "unset: each step keeps its own retries"
    assert knobs.retry_delays_seconds == (10, 60, 300)
    assert (knobs.lock_lease_seconds, knobs.gpu_lease_seconds, knobs.gpu_poll_seconds) == (120, 300, 1)
    assert knobs.gpu_limit_prefix == "gpu"
    assert (knobs.heartbeat_seconds, knobs.stale_after) == (30, 150), "stale after five heartbeats"
    assert knobs.home_dir == tmp_path.resolve() / ".quantdag"
    assert knobs.data_dir == REPO.parent / "shared" / "data"


def test_every_variable_overrides_its_default(tmp_path: Path) -> None:
    knobs = Settings.from_env({
        "QUANTDAG_HOME": str(tmp_path / "home"), "QUANTDAG_DATA": str(tmp_path / "data"),
        "QUANTDAG_TASK_RETRIES": "4", "QUANTDAG_RETRY_DELAYS_SECONDS": " 1, 2.5 ,0",
        "QUANTDAG_LOCK_LEASE_SECONDS": "6", "QUANTDAG_GPU_LEASE_SECONDS": "60", "QUANTDAG_GPU_POLL_SECONDS": "0.2",
        "QUANTDAG_GPU_LIMIT_PREFIX": "gpu-node7", "QUANTDAG_HEARTBEAT_SECONDS": "1",
        "QUANTDAG_STALE_AFTER_SECONDS": "10", "QUANTDAG_ARTIFACTS": "s3://not/a/knob"})
    assert (knobs.home_dir, knobs.data_dir) == (tmp_path / "home", tmp_path / "data")
    assert knobs.task_retries == 4 and knobs.retry_delays_seconds == (1.0, 2.5, 0.0)
    assert (knobs.lock_lease_seconds, knobs.gpu_lease_seconds, knobs.gpu_poll_seconds) == (6, 60, 0.2)
    assert knobs.gpu_limit_prefix == "gpu-node7"
    assert (knobs.heartbeat_seconds, knobs.stale_after) == (1, 10)
    assert Settings.from_env({"QUANTDAG_HEARTBEAT_SECONDS": "2"}).stale_after == 10, "five heartbeats"


def test_an_empty_variable_counts_as_unset() -> None:
    assert Settings.from_env({name: "" for name in Settings.variables()}) == Settings()


def test_settings_follow_the_environment_without_a_cache_to_clear(clean_env: pytest.MonkeyPatch) -> None:
    assert settings() is settings(), "unchanged variables: the validated model is reused"
    clean_env.setenv("QUANTDAG_GPU_POLL_SECONDS", "0.25")
    assert settings().gpu_poll_seconds == 0.25
    clean_env.delenv("QUANTDAG_GPU_POLL_SECONDS")
    assert settings().gpu_poll_seconds == 1


@pytest.mark.parametrize(("variable", "value", "complaint"), [
    ("QUANTDAG_GPU_LEASE_SECONDS", "abc", "valid number"),
    ("QUANTDAG_GPU_LEASE_SECONDS", "-1", "greater than or equal to 60"),
    ("QUANTDAG_GPU_LEASE_SECONDS", "30", "greater than or equal to 60"),
    ("QUANTDAG_GPU_LEASE_SECONDS", "90000", "less than or equal to 86400"),
    ("QUANTDAG_LOCK_LEASE_SECONDS", "0", "greater than 0"),
    ("QUANTDAG_LOCK_LEASE_SECONDS", "inf", "finite number"),
    ("QUANTDAG_GPU_POLL_SECONDS", "nan", "finite number"),
    ("QUANTDAG_HEARTBEAT_SECONDS", "-5", "greater than 0"),
    ("QUANTDAG_STALE_AFTER_SECONDS", "soon", "valid number"),
    ("QUANTDAG_TASK_RETRIES", "1.5", "valid integer"),
    ("QUANTDAG_TASK_RETRIES", "-1", "greater than or equal to 0"),
    ("QUANTDAG_RETRY_DELAYS_SECONDS", "10,,60", "item 2: Input should be a valid number"),
    ("QUANTDAG_RETRY_DELAYS_SECONDS", "10,-1", "item 2: Input should be greater than or equal to 0"),
    ("QUANTDAG_RETRY_DELAYS_SECONDS", ",".join(["1"] * 51), "at most 50 items"),
    ("QUANTDAG_GPU_LIMIT_PREFIX", "gpu/node7", "should match pattern"),
])
def test_a_bad_value_names_the_variable_its_value_and_the_fix(variable: str, value: str, complaint: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    message = str(raised.value)
    assert isinstance(raised.value, ValueError), "bad input is a ValueError"
    assert f"{variable}={value!r}: " in message, message
    assert complaint in message, message
    expect = Settings.model_fields[variable.removeprefix("QUANTDAG_").lower()].json_schema_extra["expect"]
    assert f"expected {expect} (default: " in message, message
    assert len(message.splitlines()) == 2, f"one line per bad variable: {message}"


def test_every_bad_variable_is_named_in_one_error() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"QUANTDAG_GPU_LEASE_SECONDS": "abc", "QUANTDAG_HEARTBEAT_SECONDS": "0",
                           "QUANTDAG_GPU_POLL_SECONDS": "1"})
    lines = str(raised.value).splitlines()[1:]
    assert [line.split("=")[0].strip() for line in lines] == ["QUANTDAG_GPU_LEASE_SECONDS", "QUANTDAG_HEARTBEAT_SECONDS"]


def test_a_run_is_never_stale_within_one_heartbeat() -> None:
    with pytest.raises(SettingsError, match=r"QUANTDAG_STALE_AFTER_SECONDS \(30\) must exceed QUANTDAG_HEARTBEAT_SECONDS \(30\)"):
        Settings.from_env({"QUANTDAG_STALE_AFTER_SECONDS": "30"})
    with pytest.raises(SettingsError, match="must exceed QUANTDAG_HEARTBEAT_SECONDS"):
        Settings.from_env({"QUANTDAG_STALE_AFTER_SECONDS": "5", "QUANTDAG_HEARTBEAT_SECONDS": "10"})
    assert Settings.from_env({"QUANTDAG_STALE_AFTER_SECONDS": "31"}).stale_after == 31


def test_the_library_reads_its_knobs_through_the_model(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from conf import default_env, quantdag_home
    from quantdag.runtime.locks import gpu_limit_names, lease_seconds
    from quantdag.runtime.reaper import stale_after
    from quantdag.runtime.tracking import heartbeat_seconds

    for name, value in {"QUANTDAG_HOME": str(tmp_path), "QUANTDAG_LOCK_LEASE_SECONDS": "7",
                        "QUANTDAG_HEARTBEAT_SECONDS": "3", "QUANTDAG_STALE_AFTER_SECONDS": "40",
                        "QUANTDAG_GPU_LIMIT_PREFIX": "gpu-here", "CUDA_VISIBLE_DEVICES": "2"}.items():
        clean_env.setenv(name, value)
    assert quantdag_home() == tmp_path.resolve() and default_env()["QUANTDAG_HOME"] == str(tmp_path.resolve())
    assert (lease_seconds(), heartbeat_seconds(), stale_after()) == (7, 3, 40)
    assert gpu_limit_names() == ["gpu-here-2"]
    assert gpu_limit_names({"CUDA_VISIBLE_DEVICES": "0"}) == ["gpu-0"], "an explicit environment is read alone"


def test_task_retries_and_their_delays_come_from_the_model(clean_env: pytest.MonkeyPatch) -> None:
    from quantdag.runtime.prefect_task import quantdag_task

    def step() -> None:
        pass

    declared = quantdag_task("declared_retries", retries=2)(step)
    assert (declared.retries, declared.retry_delay_seconds) == (2, [10, 60])
    assert quantdag_task("no_retries")(step).retry_delay_seconds == 0
    clean_env.setenv("QUANTDAG_TASK_RETRIES", "3")
    clean_env.setenv("QUANTDAG_RETRY_DELAYS_SECONDS", "1,2")
    replaced = quantdag_task("replaced_retries", retries=2)(step)
    assert (replaced.retries, replaced.retry_delay_seconds) == (3, [1.0, 2.0]), "Prefect repeats the last delay"
    clean_env.setenv("QUANTDAG_TASK_RETRIES", "0")
    assert quantdag_task("retries_off", retries=2)(step).retries == 0


def test_a_bad_value_fails_where_the_library_reads_it(clean_env: pytest.MonkeyPatch) -> None:
    from conf import load_profile
    from quantdag.runtime.locks import gpu_slots

    clean_env.setenv("QUANTDAG_GPU_LEASE_SECONDS", "abc")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SettingsError, match="QUANTDAG_GPU_LEASE_SECONDS='abc'"), gpu_slots():
        pytest.fail("a GPU step started with a bad lease")
    with pytest.raises(ValueError, match="QUANTDAG_GPU_LEASE_SECONDS='abc'"):
        load_profile("demo")


def test_readme_documents_every_knob() -> None:
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Settings\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md has no '## Settings' section"
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(QUANTDAG_\w+)` \| ([^|]+) \|", section.group(1), re.M)}
    missing = [name for name in Settings.variables() if name not in rows]
    assert not missing, f"README.md's Settings table lacks {missing}"
    for field in Settings.model_fields.values():
        shown = field.json_schema_extra["shown_default"]
        if field.default is not None:
            assert shown in rows[field.alias], f"README.md gives {field.alias} the default {rows[field.alias]}, not {shown}"
