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
would arrive as an int. The flow therefore takes a second, flat parameter ``revision``, which
:func:`with_revision` applies to ``profile.base.revision`` as a string.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from conf import deep_merge, load_profile
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

    Args:
        profile: shipped profile name (``demo``) or YAML path, resolved in the deploying shell.
        gpus: the ``CUDA_VISIBLE_DEVICES`` the deployment's runs get; a ``gpu-<i>`` limit is
            created for each.

    Returns:
        ``profile`` (resolved, as JSON-compatible dict), ``result_storage_block``,
        ``code_version`` and ``gpu_limits``.
    """
    resolved = load_profile(profile)
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
