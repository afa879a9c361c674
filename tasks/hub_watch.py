"""Watch step: find new base releases on the Hub and start the quantize deployment once per (repo, sha).

A scan asks the Hub (or the mirror in ``HF_ENDPOINT``) for the commit sha of every watched
branch: exact repos directly, patterns by listing the author's repos and matching names. Each
(repo, sha) then goes through three guards before anything starts:

1. the Prefect Variable ``hub-sha-<repo slug>`` already holds this sha -> nothing to do;
2. the MLflow registry already has a version tagged ``base_repo`` = repo and
   ``base_revision_sha`` = sha -> already exported, only the Variable is updated;
3. the quantize deployment is started with idempotency key ``<repo>@<sha>``: Prefect returns the
   existing flow run instead of creating a second one (the key is unique per flow).

The Variable is written only after the trigger returned, so a failed trigger is retried on the
next scan. Failures are per repo: one unreachable repo or a rate limit leaves the others alone,
and each failure keeps the repo and the HTTP status.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from typing import Any, Literal

import httpx
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict

from conf import load_profile
from conf.schema import Profile
from conf.watch import PatternEntry, RepoEntry, WatchConfig

log = logging.getLogger(__name__)

VARIABLE_PREFIX = "hub-sha-"
TRIGGER_TAG = "watch-base-releases"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Candidate(_Frozen):
    """One repo at the commit its watched branch points to now."""

    repo: str
    sha: str
    branch: str
    profile: str
    deployment: str
    name_suffix: str
    source: str  # the watch entry that found it: a repo id or 'author/glob'


class Outcome(_Frozen):
    """What the watcher did with one candidate."""

    repo: str
    sha: str
    action: Literal["triggered", "unchanged", "exported"]
    deployment: str
    flow_run_id: str | None = None
    model_name: str | None = None


class WatchFailure(_Frozen):
    """A repo (or a pattern whose listing failed) that could not be checked or triggered."""

    repo: str
    status: int | None  # HTTP status of the failing call; None when no answer came (unreachable)
    detail: str

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no HTTP answer"
        return f"{self.repo}: {status}: {self.detail}"


class HubScan(_Frozen):
    """The scan's result: candidates to check, and the repos or patterns the Hub did not answer for."""

    candidates: tuple[Candidate, ...]
    failures: tuple[WatchFailure, ...]


class WatchError(RuntimeError):
    """One repo failed; ``failure`` names it and the HTTP status."""

    def __init__(self, failure: WatchFailure) -> None:
        super().__init__(failure)  # args=(failure,) so the error pickles into a Prefect state intact
        self.failure = failure

    def __str__(self) -> str:
        return str(self.failure)


def failure_from(repo: str, err: BaseException) -> WatchFailure:
    """Describe ``err`` as a failure of ``repo``, with the HTTP status when there was an answer.

    Args:
        repo: repo id, or a pattern label such as ``Qwen/Qwen3.6-*``.
        err: what the Hub client, MLflow or Prefect raised.

    Returns:
        A :class:`WatchFailure`; ``status`` is the HTTP status of the error's response (Hub,
        httpx or Prefect API error), ``None`` when the request got no answer.
    """
    if isinstance(err, WatchError):
        return err.failure
    # Hub and httpx errors carry `.response`; Prefect's ObjectNotFound wraps the httpx error in `.http_exc`
    response = getattr(err, "response", None) or getattr(getattr(err, "http_exc", None), "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(err, HfHubHTTPError):
        detail = str(err).splitlines()[0]
    elif isinstance(err, httpx.TransportError):
        detail = f"unreachable ({type(err).__name__}: {err})"
    else:
        detail = f"{type(err).__name__}: {err}"
    return WatchFailure(repo=repo, status=status if isinstance(status, int) else None, detail=detail[:500])


# --- the Hub --------------------------------------------------------------------------------------

def hub_token(secret_block: str) -> str | None:
    """The Hub token: Prefect Secret block ``secret_block`` if it exists, else env ``HF_TOKEN``.

    The token is never logged, returned by a task, or passed as a flow parameter.

    Args:
        secret_block: name of a ``prefect.blocks.system.Secret`` document (e.g. ``hf-token``).

    Returns:
        The token, or ``None`` when neither source has one (public repos need none).
    """
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(secret_block).get()
    except ValueError:  # Prefect: "Unable to find block document named ..."
        value = None
    return str(value) if value else os.environ.get("HF_TOKEN") or None


def hub_api(token: str | None) -> HfApi:
    """A Hub client for ``HF_ENDPOINT`` (a mirror) or huggingface.co.

    Args:
        token: Hub token or ``None``.

    Returns:
        ``HfApi`` whose endpoint is read from the environment now, not at import time.

    Raises:
        RuntimeError: ``HF_HUB_OFFLINE`` is set, so no request could reach the Hub.
    """
    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: the watcher must reach the Hub or the HF_ENDPOINT mirror")
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def branch_sha(api: HfApi, repo: str, branch: str) -> str:
    """The commit sha ``branch`` of ``repo`` points to.

    Args:
        api: Hub client.
        repo: repo id ``owner/name``.
        branch: branch or tag name.

    Returns:
        The 40-hex commit sha (what a quantize run pins as ``base.revision``).

    Raises:
        huggingface_hub.errors.HfHubHTTPError: the Hub answered with an error status.
        RuntimeError: the answer had no sha.
    """
    sha = api.model_info(repo, revision=branch).sha
    if not sha:
        raise RuntimeError(f"the Hub's answer for {repo}@{branch} has no commit sha")
    return sha


def matching_repos(api: HfApi, entry: PatternEntry) -> list[str]:
    """Repo ids of ``entry.author`` whose name matches ``entry.name_glob`` and no ``entry.exclude``.

    The Hub's ``search`` (a case-insensitive substring) narrows the listing to the glob's literal
    prefix; the glob itself is then applied case-sensitively with ``fnmatch.fnmatchcase``.

    Args:
        api: Hub client.
        entry: the pattern entry.

    Returns:
        Matching repo ids, sorted.

    Raises:
        huggingface_hub.errors.HfHubHTTPError: the listing failed.
    """
    found = []
    for info in api.list_models(author=entry.author, search=entry.search or None):
        owner, _, name = info.id.partition("/")
        if owner.lower() != entry.author.lower() or not fnmatch.fnmatchcase(name, entry.name_glob):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in entry.exclude):
            continue
        found.append(info.id)
    return sorted(found)


def _candidate(entry: RepoEntry | PatternEntry, repo: str, sha: str) -> Candidate:
    return Candidate(repo=repo, sha=sha, branch=entry.branch, profile=entry.profile, deployment=entry.deployment_name,
                     name_suffix=entry.name_suffix, source=entry.label)


def scan_hub(config: WatchConfig, api: HfApi) -> HubScan:
    """Ask the Hub for the current sha of every watched repo; failures are collected, not raised.

    Exact repos are resolved first, so a repo that is both listed and matched by a pattern takes
    the exact entry's branch, profile and deployment.

    Args:
        config: the watch list.
        api: Hub client (see :func:`hub_api`).

    Returns:
        Candidates (exact repos first, then pattern matches) and one failure per repo or pattern
        the Hub did not answer for.
    """
    candidates: dict[str, Candidate] = {}
    failures: list[WatchFailure] = []
    failed: set[str] = set()

    def resolve(entry: RepoEntry | PatternEntry, repo: str) -> None:
        try:
            candidates[repo] = _candidate(entry, repo, branch_sha(api, repo, entry.branch))
        except Exception as err:  # noqa: BLE001 - contained per repo, reported by the flow
            failures.append(failure_from(repo, err))
            failed.add(repo)

    for entry in config.entries:
        if isinstance(entry, RepoEntry):
            resolve(entry, entry.repo)
    for entry in config.entries:
        if not isinstance(entry, PatternEntry):
            continue
        try:
            repos = matching_repos(api, entry)
        except Exception as err:  # noqa: BLE001 - one failing listing must not stop the other entries
            failures.append(failure_from(entry.label, err))
            continue
        for repo in repos:
            if repo not in candidates and repo not in failed:
                resolve(entry, repo)
    return HubScan(candidates=tuple(candidates.values()), failures=tuple(failures))


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

    Reads the ``base_repo`` and ``base_revision_sha`` tags that ``flows.lineage.Lineage.register``
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


# --- Prefect wrappers -----------------------------------------------------------------------------

@task(name="scan_hub", cache_policy=NO_CACHE)
def scan_hub_task(config: WatchConfig) -> HubScan:
    """Prefect wrapper of :func:`scan_hub`; the token is resolved here and never leaves the task."""
    return scan_hub(config, hub_api(hub_token(config.token_secret)))


@task(name="trigger_quantize", task_run_name="trigger-{candidate.repo}", cache_policy=NO_CACHE)
def trigger_quantize_task(candidate: Candidate) -> Outcome:
    """Prefect wrapper of :func:`trigger_quantize` (no retries: the next scheduled scan retries)."""
    return trigger_quantize(candidate)
