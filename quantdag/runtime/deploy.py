"""Deployments of the quantize flow: the ``prefect.yaml`` build step and run-time parameter overrides.

``prefect deploy --all`` runs :func:`profile_step` once per deployment in ``prefect.yaml``. The
step resolves the deployment's profile (``${VAR}`` expanded from the deploying shell), makes sure
the Prefect objects the runs need exist, and returns what the YAML templates into the deployment:

- ``profile``: the resolved profile, the deployment's default ``profile`` parameter (the UI form
  is generated from the pydantic schema and shows every field);
- ``result_storage_block``: a ``remote-file-system`` block at ``<artifact_store>/prefect-results``
  (a ``local-file-system`` block for a local store) that the worker selects through
  ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``: task results live beside the artifacts, so a UI
  Retry on a fresh worker or container still finds the finished steps;
- ``code_version``: the deployment's version.

``prefect deployment run --param k=v`` parses ``v`` as JSON and Prefect merges parameters only
at the top level, so a nested field cannot be overridden alone and ``--param revision=12345``
would arrive as an int. The flow therefore takes two more, flat parameters, applied by
:func:`apply_run_parameters`: ``revision`` (:func:`with_revision`: ``profile.base.revision``, as
a string) and ``overrides`` (:func:`with_overrides`: dotted keys, ``{"eval.max_windows": 2}``), so
a run changes one setting without sending the whole profile; the UI's run form shows both.

The build step also warns (:func:`missing_inputs`) when the profile's local inputs or its S3
bucket do not exist yet: a first run would fail on them (``quantdag prepare`` makes them).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from conf import deep_merge, describe, load_profile
from conf.schema import Profile
from quantdag.runtime.version import code_version

RESULTS_DIR = "prefect-results"


def result_storage_basepath(artifact_store: str) -> str:
    """Where Prefect keeps task results for a profile: ``<artifact_store>/prefect-results``."""
    if "://" in artifact_store:
        return f"{artifact_store.rstrip('/')}/{RESULTS_DIR}"
    return str(Path(artifact_store).expanduser().resolve() / RESULTS_DIR)


def result_storage_block_name(basepath: str) -> str:
    """A stable block name for ``basepath``: ``quantdag-results-<slug>-<8 hex>`` (Prefect slug rules)."""
    slug = re.sub(r"[^a-z0-9]+", "-", basepath.split("://")[-1].lower()).strip("-")[:40].strip("-")
    return f"quantdag-results-{slug}-{hashlib.sha256(basepath.encode()).hexdigest()[:8]}"


def ensure_result_storage(artifact_store: str) -> str:
    """Save (or update) the result-storage block for ``artifact_store``; returns ``<type-slug>/<name>``."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    basepath = result_storage_basepath(artifact_store)
    name = result_storage_block_name(basepath)
    block = RemoteFileSystem(basepath=basepath) if "://" in basepath else LocalFileSystem(basepath=basepath)
    block.save(name, overwrite=True)
    return f"{block.get_block_type_slug()}/{name}"


def ensure_gpu_limits(devices: str) -> list[str]:
    """Create a global concurrency limit ``gpu-<i>`` (limit 1) for each listed GPU that lacks one.

    Existing limits are left as they are. Returns the limit names.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from quantdag.runtime.locks import gpu_limit_names, missing_gpu_limits

    names = gpu_limit_names({"CUDA_VISIBLE_DEVICES": devices})
    with get_client(sync_client=True) as client:
        for name in missing_gpu_limits(names):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return names


def profile_step(profile: str, gpus: str = "0") -> dict[str, Any]:
    """``prefect.yaml`` build step: resolve ``profile`` and prepare what its deployment needs.

    Prints a ``warning:`` line on stderr for each input a first run would miss
    (:func:`missing_inputs`); the deployment is still made (workers may see other paths).

    Args:
        profile: shipped profile name (``demo``) or YAML path, resolved in the deploying shell.
        gpus: the ``CUDA_VISIBLE_DEVICES`` the deployment's runs get; a ``gpu-<i>`` limit is
            created for each.

    Returns:
        ``profile`` (resolved, as JSON-compatible dict), ``result_storage_block``,
        ``code_version`` and ``gpu_limits``.
    """
    resolved = load_profile(profile)
    for problem in missing_inputs(resolved):
        print(f"warning: deployment of profile {resolved.name}: {problem}", file=sys.stderr)
    return {
        "profile": json.loads(resolved.model_dump_json()),
        "result_storage_block": ensure_result_storage(resolved.artifact_store),
        "code_version": code_version(),
        "gpu_limits": ensure_gpu_limits(gpus),
    }


def with_revision(profile: Profile, revision: str | int | float | None) -> Profile:
    """``profile`` with ``base.revision`` replaced (re-validated); unchanged when ``revision`` is None.

    Raises:
        ValueError: ``revision`` is a float or bool: a sha like ``1234e56`` that the CLI parsed as
            JSON cannot be recovered; quote it (``--param revision='"1234e56"'``).
    """
    if revision is None:
        return profile
    if isinstance(revision, bool) or not isinstance(revision, str | int):
        raise ValueError(f"revision {revision!r} was parsed as {type(revision).__name__}; quote it: "
                         f"--param revision='\"<sha or tag>\"'")
    return Profile.model_validate(deep_merge(profile.model_dump(), {"base": {"revision": revision}}))


def nest_dotted(values: dict[str, Any]) -> dict[str, Any]:
    """``{"eval.max_windows": 2, "base.revision": "abc"}`` -> ``{"eval": {"max_windows": 2}, "base": {...}}``.

    Raises:
        ValueError: a key is empty or has an empty part (``"eval."``), or one key is a prefix of
            another (``"eval"`` and ``"eval.seq_len"``); the message names the key.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ValueError(f"override key {key!r}: expected dotted.field.names (e.g. eval.max_windows)")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override key {key!r} goes inside {part!r}, which is overridden as a whole")
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"override key {key!r} replaces the fields overridden one by one below it")
        node[parts[-1]] = value
    return out


def with_overrides(profile: Profile, overrides: dict[str, Any] | None) -> Profile:
    """``profile`` with dotted-key ``overrides`` merged in and re-validated; unchanged when empty.

    Args:
        profile: the resolved profile (a deployment's default ``profile`` parameter).
        overrides: ``{"eval.max_windows": 2, "text.num_samples": 64}``; values are JSON values
            (``prefect deployment run --param overrides='{"eval.max_windows": 2}'``).

    Raises:
        TypeError: ``overrides`` is not a mapping.
        ValueError: a key is malformed (:func:`nest_dotted`) or the result is not a valid
            profile; the message names every bad field by its dotted path.
    """
    if not overrides:
        return profile
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides must be a mapping of dotted keys to values, e.g. "
                        f"{{\"eval.max_windows\": 2}}; got {type(overrides).__name__}")
    from pydantic import ValidationError

    try:
        return Profile.model_validate(deep_merge(profile.model_dump(), nest_dotted(overrides)))
    except ValidationError as err:
        raise ValueError(f"overrides {json.dumps(overrides, default=str)} make an invalid profile:\n"
                         f"{describe(err)}") from err


def apply_run_parameters(profile: Profile, revision: str | int | float | None = None,
                         overrides: dict[str, Any] | None = None) -> Profile:
    """The profile a quantize run works on: ``overrides`` (:func:`with_overrides`), then ``revision``
    (:func:`with_revision`, which wins over an ``overrides`` entry ``base.revision``).

    Raises:
        TypeError, ValueError: see :func:`with_overrides` and :func:`with_revision`.
    """
    return with_revision(with_overrides(profile, overrides), revision)


def missing_inputs(profile: Profile) -> list[str]:
    """What a first run of ``profile`` would fail on that can be checked from the deploying shell.

    One line each: a local input path that does not exist (by field), an artifact store whose
    S3 bucket is missing or unreachable; each names the fix (``quantdag prepare``).
    """
    from quantdag.runtime.preflight import PreflightError, check_s3, missing_local_inputs

    problems = missing_local_inputs(profile)
    if profile.artifact_store.startswith(("s3://", "s3a://")):
        try:
            check_s3(profile.artifact_store, "artifact store")
        except PreflightError as err:
            problems.append(f"{err}; create it with `quantdag prepare {profile.name}`")
    if profile.name == "demo" and any(p.startswith(("base.local_dir", "text.path")) for p in problems):
        problems.append("the demo model and corpus are built by `quantdag prepare demo`")
    return problems
