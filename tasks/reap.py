"""Reaper step: end the MLflow runs that killed flow runs left RUNNING (``quantdag.runtime.reaper``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from quantdag.runtime.reaper import reap_stale_runs


@task(name="reap_stale_runs", cache_policy=NO_CACHE, retries=0, persist_result=False)
def reap_stale_runs_task(tracking_uri: str, current_flow_run_id: str) -> list[dict[str, Any]]:
    """Prefect wrapper of :func:`quantdag.runtime.reaper.reap_stale_runs` (never cached, never
    retried); returns the ended runs as dicts (``run_id``, ``flow_run_id``, ``status``, ``reason``)."""
    return [asdict(r) for r in reap_stale_runs(tracking_uri, current_flow_run_id)]
