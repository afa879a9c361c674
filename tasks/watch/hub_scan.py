"""Watch step, Hub side: the commit sha every watched branch points to now.

A scan asks the Hub (or the mirror in ``HF_ENDPOINT``) for the commit sha of every watched
branch: exact repos directly, patterns by listing the author's repos and matching names. It
returns a :class:`HubScan`: one :class:`Candidate` per (repo, sha) for :mod:`tasks.watch.hub_watch` to
check and trigger, and one :class:`WatchFailure` per repo or pattern the Hub did not answer for
(a failure keeps the repo and the HTTP status; one unreachable repo or a rate limit leaves the
others alone).
"""

from __future__ import annotations

import fnmatch
import os

import httpx
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.base import FrozenModel
from conf.watch import PatternEntry, RepoEntry, WatchConfig


class Candidate(FrozenModel):
    """One repo at the commit its watched branch points to now."""

    repo: str
    sha: str
    branch: str
    profile: str
    deployment: str
    name_suffix: str
    source: str  # the watch entry that found it: a repo id or 'author/glob'


class WatchFailure(FrozenModel):
    """A repo (or a pattern whose listing failed) that could not be checked or triggered."""

    repo: str
    status: int | None  # HTTP status of the failing call; None when no answer came (unreachable)
    detail: str

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no HTTP answer"
        return f"{self.repo}: {status}: {self.detail}"


class HubScan(FrozenModel):
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


# --- Prefect wrapper ------------------------------------------------------------------------------

@task(name="scan_hub", cache_policy=NO_CACHE)
def scan_hub_task(config: WatchConfig) -> HubScan:
    """Prefect wrapper of :func:`scan_hub`; the token is resolved here and never leaves the task."""
    return scan_hub(config, hub_api(hub_token(config.token_secret)))
