"""Resolve step: pin the base checkpoint's identity for this flow run (never cached).

Runs every time: it asks the Hub for the current commit sha of ``base.revision`` (or fingerprints
a local directory), and every later step keys its cache on that identity.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import BaseModelSpec
from quantdag.model.loading import BaseRef, resolve_base
from quantdag.runtime.graph import detached
from quantdag.runtime.prefect_task import retry_transient


@task(name="resolve_base", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_transient)
def resolve_base_task(spec: BaseModelSpec) -> BaseRef:
    """Prefect wrapper of :func:`quantdag.model.loading.resolve_base`.

    Returns a :func:`~quantdag.runtime.graph.detached` copy: the resolved base shares strings
    with the profile (``revision: main``), and Prefect would draw an edge from this step into
    every step that receives one of them (the fetches).
    """
    return detached(resolve_base(spec))
