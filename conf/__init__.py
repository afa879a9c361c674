"""Run profiles: YAML files validated into :class:`conf.schema.Profile`.

``load_profile("demo")`` reads ``conf/profiles/demo.yaml``; a path to any YAML file works too.
``${VAR}`` and ``${VAR:-default}`` in string values are expanded from the environment, so one
profile serves machines with different directories (``QUANTDAG_HOME``, ``QUANTDAG_DATA``).

The ``conf`` package is the bottom layer of the import order (see :mod:`quantdag`): the profile
and watch-list schemas (:mod:`conf.schema`, :mod:`conf.watch`, both on
:class:`conf.base.FrozenModel`), the ``QUANTDAG_*`` settings (:mod:`conf.settings`) and these
loaders. It imports nothing of the project but itself; every other package may import it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from conf.schema import SCHEMA_VERSION, Profile
from conf.settings import settings

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
# innermost ${...} first: a default holds no '$', '{' or '}', so nested defaults expand inside out
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


def quantdag_home() -> Path:
    """Working directory for models, data, artifacts and the MLflow DB: ``$QUANTDAG_HOME`` or ``~/.quantdag``.

    Raises:
        SettingsError: a ``QUANTDAG_*`` variable has a bad value (see :mod:`conf.settings`).
    """
    return settings().home_dir


def default_env() -> dict[str, str]:
    """Values used for ``${QUANTDAG_HOME}`` and ``${QUANTDAG_DATA}`` when the environment lacks them.

    Raises:
        SettingsError: a ``QUANTDAG_*`` variable has a bad value (see :mod:`conf.settings`).
    """
    knobs = settings()
    return {"QUANTDAG_HOME": str(knobs.home_dir), "QUANTDAG_DATA": str(knobs.data_dir)}


def expand(value: Any, env: dict[str, str] | None = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string of a nested YAML value.

    Raises:
        ValueError: a variable without default is unset (names the variable).
        SettingsError: a ``QUANTDAG_*`` knob has a bad value (a ``ValueError``; names each one).
    """
    env = {**default_env(), **os.environ, **(env or {})}
    if isinstance(value, dict):
        return {k: expand(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ValueError(f"profile uses ${{{name}}} but {name} is not set; export {name}=... or give a default")

    while (expanded := _VAR.sub(substitute, value)) != value:
        value = expanded
    return value


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """The YAML file for a profile name or path.

    Raises:
        ValueError: no such profile (lists the shipped ones).
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = PROFILES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ValueError(f"profile {name_or_path!r} not found: give a YAML path or one of {list_profiles()}")


class ProfileLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's integers: only plain decimals are numbers.

    YAML 1.1 (PyYAML's default) reads ``0123456`` as octal 42798, ``0x1f`` as 31 and ``1_000`` as
    1000, which would silently change a revision such as a short commit sha; here they stay
    strings. (YAML 1.2 core schema, https://yaml.org/spec/1.2.2/#1032-tag-resolution.)
    """


ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ProfileLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                    list("-+0123456789"))


def read_yaml(path: Path) -> Any:
    """Parse a profile or watch file with :class:`ProfileLoader`."""
    try:
        return yaml.load(path.read_text(), Loader=ProfileLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:  # one line: file, line:column, what the parser says
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); fix the file there") from err


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Profile:
    """Read, expand and validate a profile.

    Args:
        name_or_path: shipped profile name (``demo``) or a YAML path.
        overrides: nested values merged over the YAML (e.g. ``{"base": {"revision": "abc"}}``).
        env: extra variables for ``${VAR}`` expansion.

    Raises:
        ValueError: unknown profile, wrong ``schema_version``, or a validation error; the message
            names each bad field by its dotted path. A bad ``QUANTDAG_*`` knob raises
            :class:`conf.settings.SettingsError`, a ``ValueError`` too.
    """
    path = profile_path(name_or_path)
    raw = read_yaml(path) or {}
    if raw.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {raw.get('schema_version')} is not {SCHEMA_VERSION}")
    data = deep_merge(expand(raw, env), overrides or {})
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        where = f"{path} with overrides {overrides}" if overrides else str(path)
        raise ValueError(f"{where}: invalid profile:\n{describe(err)}") from err


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in recursively (``extra`` wins)."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def describe(err: ValidationError) -> str:
    """One line per error: ``dotted.field: message``."""
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
