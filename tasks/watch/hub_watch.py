"""Watch step: start the quantize deployment once per (repo, sha) that :mod:`tasks.watch.hub_scan` found.

Each (repo, sha) of the scan goes through three guards before anything starts:

1. the Prefect Variable ``hub-sha-<repo slug>`` already holds this sha -> nothing to do;
2. the MLflow registry already has a version tagged ``base_repo`` = repo and
   ``base_revision_sha`` = sha -> already exported, only the Variable is updated;
3. the quantize deployment is started with idempotency key ``<repo>@<sha>``: Prefect returns the
   existing flow run instead of creating a second one (the key is unique per flow).

The Variable is written only after the trigger returned, so a failed trigger is retried on the
next scan. Failures are per repo: one failing repo leaves the others alone, and each failure
keeps the repo and the HTTP status.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict

from conf import load_profile
from conf.schema import Profile
from tasks.watch.hub_scan import Candidate, WatchError, WatchFailure, failure_from

log = logging.getLogger(__name__)

VARIABLE_PREFIX = "hub-sha-"
TRIGGER_TAG = "watch-base-releases"


class Outcome(BaseModel):
    """What the watcher did with one candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    sha: str
    action: Literal["triggered", "unchanged", "exported"]
    deployment: str
    flow_run_id: str | None = None
    model_name: str | None = None


# --- state: Prefect Variables ---------------------------------------------------------------------

def slug(text: str) -> str:
    """Lowercase letters, digits and single dashes: ``Qwen/Qwen3.6-27B`` -> ``qwen-qwen3-6-27b``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def state_variable_name(repo: str) -> str:
    """Name of the Prefect Variable holding the last sha seen for ``repo`` (``hub-sha-qwen-qwen3-6-27b``)."""
    return (VARIABLE_PREFIX + slug(repo))[:255]


def last_seen_sha(repo: str) -> str | None:
    """The sha recorded for ``repo`` by the last successful trigger, or ``None``.

    The Variable's value is ``{"repo", "sha", "flow_run_id"}``; a value written for another repo
    whose name slugifies the same way does not count as seen.
    """
    from prefect.variables import Variable

    value = Variable.get(state_variable_name(repo), default=None)
    if isinstance(value, dict) and value.get("repo") == repo:
        return value.get("sha")
    return None


def remember_sha(repo: str, sha: str, flow_run_id: str | None) -> None:
    """Record ``sha`` as handled for ``repo`` (call only after the trigger succeeded).

    Args:
        repo: repo id.
        sha: the commit handled.
        flow_run_id: the quantize flow run started for it; ``None`` when it was already exported.
    """
    from prefect.variables import Variable

    Variable.set(state_variable_name(repo), {"repo": repo, "sha": sha, "flow_run_id": flow_run_id},
                 overwrite=True, tags=[TRIGGER_TAG])


# --- the quantize run -----------------------------------------------------------------------------

def derived_name(repo: str, suffix: str) -> str:
    """Run and model name for a repo that is not its profile's own base: ``Qwen/Qwen3.6-32B`` -> ``qwen3.6-32b-nvfp4``."""
    name = re.sub(r"[^a-z0-9.\-]+", "-", repo.partition("/")[2].lower()).strip(".-")
    return f"{name}-{suffix}"


def run_profile(candidate: Candidate) -> Profile:
    """The profile the quantize run gets: the entry's profile pinned to ``candidate.sha``.

    When ``candidate.repo`` is the profile's own ``base.repo_id`` the profile keeps its name and
    registered model. Any other repo (a new size found by a pattern) gets its own name and
    registered model, :func:`derived_name`, so two sizes never share a registry entry.

    Args:
        candidate: the repo and sha to quantize and the entry's profile.

    Returns:
        The validated profile, ``base.repo_id`` = repo and ``base.revision`` = sha.

    Raises:
        ValueError: the profile does not load or the derived name is invalid.
    """
    profile = load_profile(candidate.profile)
    overrides: dict[str, Any] = {
        "base": {"repo_id": candidate.repo, "revision": candidate.sha, "local_dir": None, "gguf_file": None},
    }
    if profile.base.repo_id != candidate.repo:
        name = derived_name(candidate.repo, candidate.name_suffix)
        overrides |= {"name": name, "registered_model_name": name}
    return load_profile(candidate.profile, overrides)


def already_exported(tracking_uri: str, model_name: str, repo: str, sha: str) -> bool:
    """Whether the registry holds a version of ``model_name`` built from ``repo`` at commit ``sha``.

    Reads the ``base_repo`` and ``base_revision_sha`` tags that ``quantdag.runtime.lineage.Lineage.register``
    puts on every model version. A model that does not exist yet has no versions.

    Args:
        tracking_uri: MLflow tracking URI (the profile's).
        model_name: registered model name (``profile.model_name``).
        repo: base repo id.
        sha: base commit sha.

    Returns:
        True when some version carries both tags.
    """
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(tracking_uri=tracking_uri).search_model_versions(f"name='{model_name}'")
    return any(v.tags.get("base_revision_sha") == sha and v.tags.get("base_repo") == repo for v in versions)


def idempotency_key(repo: str, sha: str) -> str:
    """Prefect idempotency key of the quantize run for one base commit: ``<repo>@<sha>``."""
    return f"{repo}@{sha}"


def trigger_quantize(candidate: Candidate) -> Outcome:
    """Start the quantize deployment for ``candidate`` unless it was seen or exported already.

    Args:
        candidate: repo, sha, profile and deployment from :func:`scan_hub`.

    Returns:
        ``unchanged`` (the Variable holds this sha), ``exported`` (the registry has it) or
        ``triggered`` with the flow run id; a repeated trigger of the same ``repo@sha`` returns the
        existing flow run (Prefect's idempotency key) rather than creating another.

    Raises:
        WatchError: anything failed; names the repo and, when there was one, the HTTP status.
    """
    from prefect.deployments import run_deployment

    repo, sha = candidate.repo, candidate.sha
    base = {"repo": repo, "sha": sha, "deployment": candidate.deployment}
    try:
        if last_seen_sha(repo) == sha:
            return Outcome(action="unchanged", **base)
        profile = run_profile(candidate)
        if already_exported(profile.tracking_uri, profile.model_name, repo, sha):
            remember_sha(repo, sha, None)
            return Outcome(action="exported", model_name=profile.model_name, **base)
        try:
            flow_run = run_deployment(candidate.deployment, parameters={"profile": profile.model_dump(mode="json")},
                                      idempotency_key=idempotency_key(repo, sha), timeout=0, as_subflow=False,
                                      tags=[TRIGGER_TAG])
        except ObjectNotFound as err:
            raise WatchError(WatchFailure(repo=repo, status=404, detail=(
                f"deployment {candidate.deployment!r} not found on the Prefect server; deploy it first"))) from err
        remember_sha(repo, sha, str(flow_run.id))
        return Outcome(action="triggered", flow_run_id=str(flow_run.id), model_name=profile.model_name, **base)
    except Exception as err:  # noqa: BLE001 - re-raised with the repo and HTTP status named
        raise WatchError(failure_from(repo, err)) from err


def failure_of_state(candidate: Candidate, state: Any) -> WatchFailure:
    """The :class:`WatchFailure` carried by a failed Prefect state of :func:`trigger_quantize_task`."""
    err = state.result(raise_on_failure=False)
    if isinstance(err, BaseException):
        return failure_from(candidate.repo, err)
    return WatchFailure(repo=candidate.repo, status=None, detail=f"task ended {state.name}: {state.message}")


def report_markdown(outcomes: list[Outcome], failures: list[WatchFailure]) -> str:
    """Prefect artifact of one watcher run: one row per repo."""
    lines = ["# watch-base-releases", "", "| repo | sha | action | quantize run |", "|---|---|---|---|"]
    lines += [f"| {o.repo} | `{o.sha[:12]}` | {o.action} | {o.flow_run_id or '-'} |" for o in outcomes]
    lines += [f"| {f.repo} | - | failed: {str(f).removeprefix(f'{f.repo}: ').replace('|', '/')} | - |" for f in failures]
    return "\n".join(lines) + "\n"


# --- Prefect wrapper ------------------------------------------------------------------------------

@task(name="trigger_quantize", task_run_name="trigger-{candidate.repo}", cache_policy=NO_CACHE)
def trigger_quantize_task(candidate: Candidate) -> Outcome:
    """Prefect wrapper of :func:`trigger_quantize` (no retries: the next scheduled scan retries)."""
    return trigger_quantize(candidate)
