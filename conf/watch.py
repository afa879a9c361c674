"""The base-release watch list: which Hub repositories trigger a quantize run, and when to look.

``conf/watch.yaml`` is validated into :class:`WatchConfig`. An entry is either an exact repo
(``repo`` + ``branch``: the branch's commit sha is tracked) or a pattern (``author`` +
``name_glob``: every repo of that author whose name matches is tracked on ``branch``). Each
entry names the profile the triggered quantize run starts from and, optionally, the quantize
deployment to start (default ``quantize/<profile with '.' replaced by '-'>``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator

from conf import describe, expand, read_yaml
from conf.base import FrozenModel

WATCH_FILE = Path(__file__).resolve().parent / "watch.yaml"
WATCH_SCHEMA_VERSION = 1

_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_AUTHOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SUFFIX = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


class _Entry(FrozenModel):
    branch: str = Field("main", description="branch (or tag) whose commit sha is tracked")
    profile: str = Field(description="profile the quantize run starts from (name under conf/profiles or a path)")
    deployment: str | None = Field(
        None, description="quantize deployment 'flow/deployment'; default quantize/<profile, '.' -> '-'>"
    )
    name_suffix: str = Field(
        "nvfp4", description="suffix of the run and model name when the repo is not the profile's own base"
    )

    @field_validator("branch", "profile")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("deployment")
    @classmethod
    def _flow_slash_deployment(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise ValueError(f"{value!r} is not 'flow-name/deployment-name'")
        return value

    @field_validator("name_suffix")
    @classmethod
    def _suffix_slug(cls, value: str) -> str:
        if not _SUFFIX.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits, '.' or '-'")
        return value

    @property
    def deployment_name(self) -> str:
        """The quantize deployment to start: ``deployment`` or ``quantize/<profile slug>``."""
        stem = Path(self.profile).name.removesuffix(".yaml").removesuffix(".yml")
        return self.deployment or f"quantize/{stem.replace('.', '-')}"


class RepoEntry(_Entry):
    """One exact Hub repository, e.g. ``Qwen/Qwen3.6-27B`` on ``main``."""

    repo: str = Field(description="Hub repo id 'owner/name'")

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _REPO.match(value):
            raise ValueError(f"{value!r} is not a Hub repo id 'owner/name'")
        return value

    @property
    def label(self) -> str:
        """How failures and logs name this entry."""
        return self.repo


class PatternEntry(_Entry):
    """Every repository of ``author`` whose name matches ``name_glob`` (fnmatch, case-sensitive)."""

    author: str = Field(description="Hub user or organisation, e.g. Qwen")
    name_glob: str = Field(description="fnmatch pattern over the repo name (after 'author/'), e.g. Qwen3.6-*")
    exclude: tuple[str, ...] = Field(
        (), description="fnmatch patterns over the repo name that are never triggered (e.g. *-FP8, *-GGUF)"
    )

    @field_validator("author")
    @classmethod
    def _author(cls, value: str) -> str:
        if not _AUTHOR.match(value):
            raise ValueError(f"{value!r} is not a Hub user or organisation name")
        return value

    @field_validator("name_glob")
    @classmethod
    def _glob(cls, value: str) -> str:
        if not value.strip() or "/" in value:
            raise ValueError(f"{value!r} must be a non-empty pattern over the repo name, without 'author/'")
        return value

    @property
    def label(self) -> str:
        """How failures and logs name this entry."""
        return f"{self.author}/{self.name_glob}"

    @property
    def search(self) -> str:
        """The literal text before the first wildcard: the Hub's ``search`` narrows the listing with it."""
        return re.split(r"[*?\[]", self.name_glob, maxsplit=1)[0]


def _entry_kind(value: Any) -> str | None:
    if isinstance(value, RepoEntry | PatternEntry):
        return "repo" if isinstance(value, RepoEntry) else "pattern"
    has_repo, has_author = ("repo" in value, "author" in value) if isinstance(value, dict) else (False, False)
    if has_repo == has_author:
        return None
    return "repo" if has_repo else "pattern"


WatchEntry = Annotated[
    Annotated[RepoEntry, Tag("repo")] | Annotated[PatternEntry, Tag("pattern")],
    Discriminator(
        _entry_kind,
        custom_error_type="watch_entry",
        custom_error_message="an entry has exactly one of 'repo' (exact repo) or 'author' + 'name_glob' (pattern)",
    ),
]


class WatchConfig(FrozenModel):
    """The watcher's schedule and watch list."""

    schema_version: Literal[1] = WATCH_SCHEMA_VERSION
    cron: str = Field(description="when the watcher runs, e.g. '*/30 * * * *'")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in")
    entries: tuple[WatchEntry, ...] = Field(description="exact repos and patterns; exact repos take precedence")
    token_secret: str = Field("hf-token", description="Prefect Secret block holding a Hub token (else env HF_TOKEN)")
    work_pool: str | None = Field(
        None, description="work pool of the watcher deployment; null: run it with `serve` (no worker)"
    )

    @field_validator("entries")
    @classmethod
    def _entries(cls, value: tuple[RepoEntry | PatternEntry, ...]) -> tuple[RepoEntry | PatternEntry, ...]:
        if not value:
            raise ValueError("the watch list is empty: add a 'repo' or an 'author' + 'name_glob' entry")
        repos = [e.repo for e in value if isinstance(e, RepoEntry)]
        twice = sorted({r for r in repos if repos.count(r) > 1})
        if twice:
            raise ValueError(f"repos listed more than once: {twice}")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)  # the check Prefect's API applies to a deployment's schedule
        except ValidationError as err:
            raise ValueError(f"{value!r} is not a 5-field cron expression (e.g. '0 */6 * * *')") from err
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from err
        return value


def load_watch(path: str | Path | None = None, env: dict[str, str] | None = None) -> WatchConfig:
    """Read, expand (``${VAR}``) and validate the watch list.

    Args:
        path: a YAML file; default ``conf/watch.yaml``.
        env: extra variables for ``${VAR}`` expansion.

    Returns:
        The validated :class:`WatchConfig`.

    Raises:
        ValueError: the file is missing, has another ``schema_version``, or fails validation; the
            message names each bad field by its dotted path (e.g. ``entries.1.pattern.name_glob``).
    """
    path = Path(path) if path is not None else WATCH_FILE
    if not path.is_file():
        raise ValueError(f"watch list {path} not found")
    raw = read_yaml(path) or {}
    if raw.get("schema_version", WATCH_SCHEMA_VERSION) != WATCH_SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {raw.get('schema_version')} is not {WATCH_SCHEMA_VERSION}")
    try:
        return WatchConfig.model_validate(expand(raw, env))
    except ValidationError as err:
        raise ValueError(f"{path}: invalid watch list:\n{describe(err)}") from err
