"""Names of quantize runs that say what ran: ``<profile>-<base>@<sha7>-<recipe tag>``.

The same name labels the Prefect flow run and its MLflow parent run, so runs of different
profiles, base commits or recipes can be told apart in both UIs (``demo-model@b51f660-nvfp4-max-kvfp8``).

Prefect renames a flow run to its ``flow_run_name`` when the run starts. :func:`flow_run_name`
is that callable for the quantize flow: it keeps a name that someone gave the run (the custom-run
form of the Prefect UI, ``prefect deployment run --flow-run-name``) and replaces only a name of
the shape Prefect generates when none is given (two lowercase words, ``crimson-lemur``).
Before the base is resolved the name carries the revision as asked (``main``, or the first 7
characters of a sha); :func:`settle_flow_run_name` then puts in the commit sha actually loaded
(a local base: the first 7 hex digits of its fingerprint).

A retried flow run (the UI's Retry) keeps its id and name and lists the task runs of every
attempt; :func:`tag_attempts` tags those of attempt 2 and later ``attempt-<n>``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from conf.schema import Profile, RecipeSpec

_GENERATED = re.compile(r"^[a-z]+-[a-z]+$")
"""Shape of the names Prefect generates for a run created without one (``coolname``: adjective-animal)."""
_SHA = re.compile(r"^[0-9a-f]{7,64}$")


_FORMAT_TAGS = {"nvfp4": "nvfp4", "nvfp4_w4a16": "w4a16", "fp8": "fp8", "bf16": "bf16"}


def recipe_label(recipe: RecipeSpec) -> str:
    """What the recipe does, read from its fields (never from its ``name``, which a changed setting
    leaves as it was): the linear formats, then the weight-scale rule.

    ``nvfp4-max`` (every group NVFP4 W4A4), ``w4a16-mse``, ``mlp-nvfp4-attn-fp8-lin-fp8-local_hessian``.
    """
    groups = {"mlp": recipe.formats.mlp, "attn": recipe.formats.attention, "lin": recipe.formats.linear_attention}
    formats = {_FORMAT_TAGS.get(fmt, fmt) for fmt in groups.values()}
    label = formats.pop() if len(formats) == 1 else "-".join(f"{g}-{_FORMAT_TAGS.get(f, f)}" for g, f in groups.items())
    return f"{label}-{recipe.weight_scale}"


def recipe_tag(recipe: RecipeSpec) -> str:
    """A short tag of the recipe for run names: :func:`recipe_label`, plus ``-kvfp8`` for an FP8 KV cache.

    ``nvfp4-max-kvfp8`` for the reference recipe (NVFP4 W4A4, max-calibrated scales, FP8 E4M3 KV
    cache with constant amax). The one place that reads a :class:`RecipeSpec` for a label.
    """
    label = recipe_label(recipe)
    return f"{label}-kvfp8" if recipe.kv_cache == "fp8_cast" else label


def recipe_summary(recipe: RecipeSpec) -> str:
    """One line that describes the recipe for people: formats per module group, weight-scale rule,
    KV cache and how many exclusion patterns (``exclude_modules``) it has."""
    formats = ", ".join(f"{group} {fmt}" for group, fmt in recipe.formats.model_dump().items())
    kv = "FP8 E4M3 KV cache (constant amax 448)" if recipe.kv_cache == "fp8_cast" else "BF16 KV cache"
    named = recipe.name if recipe.name == recipe_label(recipe) else f"{recipe.name} ({recipe_label(recipe)})"
    return (f"`{named}`: {formats}; {recipe.weight_scale} weight scales, block {recipe.group_size}; {kv}; "
            f"{len(recipe.exclude_modules)} exclude_modules patterns")


def base_short(repo_id: str | None, local_dir: str | None) -> str:
    """The last path part of a Hub repo id (``Qwen3.6-27B``) or of a local directory (``model``)."""
    return str(repo_id or local_dir or "base").rstrip("/").rsplit("/", 1)[-1]


def short_revision(revision: str) -> str:
    """A commit sha cut to 7 hex digits; a branch or tag as it is (``main``, ``v1.0``)."""
    return revision[:7] if _SHA.match(revision) else revision


def run_name(profile: Profile, resolved: Any = None) -> str:
    """``<profile>-<base>@<revision>-<recipe tag>`` of a quantize run.

    Args:
        profile: the run's profile (after its run parameters were applied).
        resolved: the resolved base (:class:`quantdag.model.loading.BaseRef`) when known: its
            commit sha (a Hub base) or its fingerprint (a local base) replaces the revision asked for.

    Returns:
        e.g. ``qwen3.6-27b-nvfp4-Qwen3.6-27B@1a2b3c4-nvfp4-max-kvfp8``.
    """
    base = profile.base
    revision = short_revision(base.revision)
    if resolved is not None:
        revision = (resolved.revision_sha or resolved.fingerprint)[:7]
    elif base.local_dir:
        revision = "local"
    return f"{profile.name}-{base_short(base.repo_id, base.local_dir)}@{revision}-{recipe_tag(profile.recipe)}"


def is_generated(name: str | None) -> bool:
    """Whether ``name`` is empty or has the shape of a name Prefect generated (``crimson-lemur``)."""
    return not name or bool(_GENERATED.match(name))


def flow_run_name() -> str:
    """Prefect ``flow_run_name`` callable of the quantize flow (run in the flow run's context).

    Returns the run's current name when it was given one (not :func:`is_generated`), otherwise
    :func:`run_name` of the profile with the run's ``revision`` and ``overrides`` applied. A
    profile that does not validate keeps the current name: the flow then fails with the error.
    """
    from prefect.context import FlowRunContext

    from quantdag.runtime.deploy import apply_run_parameters

    context = FlowRunContext.get()
    current = context.flow_run.name if context and context.flow_run else None
    if not is_generated(current):
        return current
    parameters = dict(context.parameters or {}) if context else {}
    try:
        profile = apply_run_parameters(Profile.model_validate(parameters["profile"]), parameters.get("revision"),
                                       parameters.get("overrides"))
    except (KeyError, ValueError, TypeError):
        return current or "quantize"
    return run_name(profile)


def settle_flow_run_name(flow_run_id: str, profile: Profile, resolved: Any) -> str:
    """Put the resolved base's sha into the flow run's name when it still carries the revision asked for.

    Args:
        flow_run_id: the Prefect flow run.
        profile: the run's profile (run parameters applied).
        resolved: the resolved base (``BaseRef``).

    Returns:
        The flow run's name from now on (a name given to the run is kept as it is).
    """
    from prefect.client.orchestration import get_client

    final = run_name(profile, resolved)
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id).name
        if current != run_name(profile) or current == final:
            return current
        client.set_flow_run_name(flow_run_id, final)
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context and context.flow_run and str(context.flow_run.id) == str(flow_run_id):
        context.flow_run.name = final
    return final


def tag_attempts(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Flow body decorator (under ``@flow``): the task runs of attempt ``n >= 2`` of the flow run get
    the Prefect tag ``attempt-<n>``, so a retried run's new task runs are told from the old ones."""

    @functools.wraps(fn)
    def body(*args: Any, **kwargs: Any) -> Any:
        from prefect import tags
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        attempt = context.flow_run.run_count if context and context.flow_run else 1
        with tags(f"attempt-{attempt}") if attempt > 1 else tags():
            return fn(*args, **kwargs)

    return body
