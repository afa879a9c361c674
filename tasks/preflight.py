"""Preflight step: check every endpoint and local input a run needs before any model loads."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Profile
from quantdag.runtime.preflight import preflight


@task(name="preflight", cache_policy=NO_CACHE, retries=0, persist_result=False)
def preflight_task(profile: Profile) -> dict[str, Any]:
    """Prefect wrapper of :func:`quantdag.runtime.preflight.preflight` (never cached, never retried)."""
    return preflight(profile)
