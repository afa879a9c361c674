"""Preflight step: check every endpoint and local input a run needs before any model loads."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Profile
from quantdag.runtime.preflight import preflight


@task(name="preflight", cache_policy=NO_CACHE, retries=0, persist_result=False)
def preflight_task(profile: Profile) -> str:
    """Prefect wrapper of :func:`quantdag.runtime.preflight.preflight` (never cached, never retried).

    Returns what was checked as one new string, not the checked values themselves: Prefect links a
    task's result (and its items) to later tasks that receive the same objects, and the profile's
    strings (the artifact store) go to every step, which drew an edge from preflight to each of them.
    """
    return "checked " + ", ".join(f"{key} {value}" for key, value in preflight(profile).items())
