"""Runtime settings: every ``QUANTDAG_*`` knob of the library in one typed, validated model.

:func:`settings` reads them from ``os.environ``; the library reads knobs only through it. A bad
value fails with ONE :class:`SettingsError` that names every offending variable, its value,
what it expects and its default. An empty variable counts as unset.

The model is cached on the values of the variables it reads: every call re-reads those few
variables (a dictionary lookup each) and validates again only when one of them changed, so a
process that sets one (``quantdag demo --home``, ``monkeypatch.setenv`` in a test) gets the new
value on its next call, and there is no cache to clear. Worker processes and subprocesses read
their own environment.

``${QUANTDAG_ARTIFACTS}``, like any ``${VAR}`` in a profile, is profile expansion
(:func:`conf.expand`), not a knob; :attr:`Settings.home_dir` and :attr:`Settings.data_dir` are
the values ``${QUANTDAG_HOME}`` and ``${QUANTDAG_DATA}`` take when the environment lacks them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from conf.base import FrozenModel

_CHECKOUT_PARENT = Path(__file__).resolve().parent.parent.parent


class SettingsError(ValueError):
    """A ``QUANTDAG_*`` variable has a bad value; the message names each one and its fix."""


def _knob(default: Any, variable: str, description: str, expect: str, shown_default: str | None = None,
          **bounds: Any) -> Any:
    """A field read from ``variable``; ``expect`` and ``shown_default`` word the fix in errors."""
    return Field(default, alias=variable, description=description, **bounds,
                 json_schema_extra={"expect": expect, "shown_default": shown_default or (
                     f"{default:g}" if isinstance(default, float) else str(default))})


class Settings(FrozenModel):
    """The ``QUANTDAG_*`` knobs, validated. Fields are named after their variable, without prefix.

    Build it with :func:`settings` (this process's environment) or :meth:`from_env` (a mapping);
    ``Settings()`` holds the defaults.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    home: Path | None = _knob(
        None, "QUANTDAG_HOME",
        "Working directory for models, demo data, local artifacts and the MLflow SQLite DB; a path.",
        "a directory", "~/.quantdag")
    data: Path | None = _knob(
        None, "QUANTDAG_DATA",
        "Directory of the shared data sets that profiles name as ${QUANTDAG_DATA}; a path.",
        "a directory", "../shared/data beside the checkout")
    task_retries: int | None = _knob(
        None, "QUANTDAG_TASK_RETRIES",
        "Retries of a cached step (quantdag.runtime.prefect_task.quantdag_task) after a transient "
        "failure (Hub/S3 5xx, throttling, connection reset), replacing the step's own count; 0 "
        "disables retries. Read when the module defining the step is imported.",
        "an integer >= 0", "each step's own, 2 for the Hub/S3 fetches and 0 for the others", ge=0)
    retry_delays_seconds: tuple[Annotated[float, Field(ge=0)], ...] = _knob(
        (10.0, 60.0, 300.0), "QUANTDAG_RETRY_DELAYS_SECONDS",
        "Seconds before the 1st, 2nd, ... retry of a cached step, comma-separated; the last repeats "
        "for further retries. Read when the module defining the step is imported.",
        "1 to 50 comma-separated numbers of seconds >= 0, e.g. 10,60,300", "10,60,300",
        min_length=1, max_length=50)
    lock_lease_seconds: float = _knob(
        120.0, "QUANTDAG_LOCK_LEASE_SECONDS",
        "Lease of a step lock in seconds: a killed holder frees the step this long after its last "
        "renewal (renewed every quarter lease).",
        "a number of seconds > 0", gt=0)
    gpu_lease_seconds: float = _knob(
        300.0, "QUANTDAG_GPU_LEASE_SECONDS",
        "Lease of a GPU slot in seconds: a killed holder frees the GPU this long after its last "
        "renewal; Prefect's server accepts 60 to 86400.",
        "a number of seconds from 60 to 86400", ge=60, le=86400)
    gpu_poll_seconds: float = _knob(
        1.0, "QUANTDAG_GPU_POLL_SECONDS",
        "Seconds between rounds over the GPU limits while every visible GPU is taken.",
        "a number of seconds > 0", gt=0)
    gpu_limit_prefix: str = _knob(
        "gpu", "QUANTDAG_GPU_LIMIT_PREFIX",
        "Prefix of the GPU concurrency-limit names (<prefix>-<CUDA device index>); give each host "
        "its own (gpu-<host>) when several hosts share one Prefect server.",
        "a name without / % & < > (Prefect refuses them in limit names)", pattern=r"^[^/%&<>]+$")
    heartbeat_seconds: float = _knob(
        30.0, "QUANTDAG_HEARTBEAT_SECONDS",
        "Seconds between heartbeats of a running flow's MLflow parent run.",
        "a number of seconds > 0", gt=0)
    stale_after_seconds: float | None = _knob(
        None, "QUANTDAG_STALE_AFTER_SECONDS",
        "Seconds without a heartbeat after which another run's MLflow runs are ended as KILLED "
        "(and its Prefect run marked Crashed); must exceed QUANTDAG_HEARTBEAT_SECONDS.",
        "a number of seconds > 0 above QUANTDAG_HEARTBEAT_SECONDS", "5 x QUANTDAG_HEARTBEAT_SECONDS = 150",
        gt=0)

    @field_validator("retry_delays_seconds", mode="before")
    @classmethod
    def _split_delays(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _stale_after_a_heartbeat(self) -> Settings:
        if self.stale_after_seconds is not None and self.stale_after_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"QUANTDAG_STALE_AFTER_SECONDS ({self.stale_after_seconds:g}) must exceed QUANTDAG_HEARTBEAT_SECONDS "
                f"({self.heartbeat_seconds:g}), or every live run would be reaped; raise it or unset it "
                "(default 5 heartbeats)")
        return self

    @property
    def home_dir(self) -> Path:
        """:attr:`home` (``~`` expanded), else ``~/.quantdag``; absolute, resolved at each access."""
        return (self.home or Path.home() / ".quantdag").expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        """:attr:`data`, else ``../shared/data`` beside the checkout."""
        return self.data or _CHECKOUT_PARENT / "shared" / "data"

    @property
    def stale_after(self) -> float:
        """:attr:`stale_after_seconds`, else five :attr:`heartbeat_seconds`; in seconds."""
        return self.stale_after_seconds if self.stale_after_seconds is not None else 5 * self.heartbeat_seconds

    @classmethod
    def variables(cls) -> list[str]:
        """The environment variable of every field, in field order."""
        return [field.alias for field in cls.model_fields.values()]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Validate the knobs found in ``env`` (empty values count as unset); cached per value.

        Raises:
            SettingsError: a value is malformed or out of bounds; names every such variable,
                its value, what it expects and its default.
        """
        return _parse(tuple(env.get(name) or None for name in cls.variables()))


def settings() -> Settings:
    """This process's :class:`Settings`, from ``os.environ`` as it is now (see the module docstring).

    Raises:
        SettingsError: a ``QUANTDAG_*`` value is malformed or out of bounds (names each one).
    """
    return Settings.from_env(os.environ)


@functools.lru_cache(maxsize=32)
def _parse(values: tuple[str | None, ...]) -> Settings:
    raw = {name: value for name, value in zip(Settings.variables(), values) if value is not None}
    try:
        return Settings.model_validate(raw)
    except ValidationError as err:
        raise SettingsError(_describe(err, raw)) from err


def _describe(err: ValidationError, raw: dict[str, str]) -> str:
    """One line per bad variable: its value, pydantic's complaints, what it expects, its default."""
    fields = {field.alias: field for field in Settings.model_fields.values()}
    complaints: dict[str, list[str]] = {}
    for error in err.errors():
        message = error["msg"].removeprefix("Value error, ")
        variable = error["loc"][0] if error["loc"] and error["loc"][0] in fields else ""
        complaints.setdefault(variable, []).append(
            "".join(f"item {i + 1}: " for i in error["loc"][1:] if isinstance(i, int)) + message)
    lines = ["invalid QUANTDAG_* settings in the environment (unset a variable for its default):"]
    for variable, messages in complaints.items():
        if not variable:
            lines += [f"  {message}" for message in messages]
            continue
        extra = fields[variable].json_schema_extra
        lines.append(f"  {variable}={raw.get(variable)!r}: {'; '.join(messages)}; expected {extra['expect']} "
                     f"(default: {extra['shown_default']})")
    return "\n".join(lines)
