"""The steps' plain functions in a process that runs no Prefect: the baseline's and the measurements'.

``tasks.fetch``, ``tasks.calibrate`` and ``tasks.export`` define each step as a plain function plus
a cached ``@task`` wrapper built by ``quantdag.runtime.prefect_task.quantdag_task``, which imports
Prefect. A one-process ModelOpt script uses only the plain functions. :func:`install` puts a
stand-in for ``quantdag.runtime.prefect_task`` in ``sys.modules`` whose ``quantdag_task`` leaves the
function undecorated, and makes ``prefect`` and ``mlflow`` unimportable in the process (as on a
host without them: ``importlib.util.find_spec`` answers None, ``import`` raises ImportError). The
steps' optional Prefect progress artifacts (``quantdag.runtime.progress``) are then skipped the
same way whether the packages are installed or not, and the baseline's time holds no orchestrator.
Only the stages of ``benchmarks.bench_stages`` that never run the flow call it, in their own process.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable

MODULE = "quantdag.runtime.prefect_task"
ABSENT = ("prefect", "mlflow")


def _undecorated(name: str, **_: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def keep(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn

    return keep


def install() -> bool:
    """Stand in for ``quantdag.runtime.prefect_task`` and hide ``prefect`` / ``mlflow``, unless the
    real module is already imported; True if it did.

    Raises:
        RuntimeError: ``prefect`` or ``mlflow`` is already imported in this process (the flow's
            stages must not call this).
    """
    if MODULE in sys.modules:
        return False
    if any(sys.modules.get(name) is not None for name in ABSENT):
        raise RuntimeError(f"plain_steps.install() in a process that already imported one of {ABSENT}")
    for name in ABSENT:
        sys.modules[name] = None  # type: ignore[assignment]
    module = types.ModuleType(MODULE, "Stand-in without Prefect: quantdag_task leaves the step function as is.")
    module.quantdag_task = _undecorated  # type: ignore[attr-defined]
    sys.modules[MODULE] = module
    import quantdag.runtime

    quantdag.runtime.prefect_task = module  # type: ignore[attr-defined]
    return True


def orchestrators_imported() -> list[str]:
    """Modules of ``prefect`` / ``mlflow`` imported in this process (the baseline expects none)."""
    return sorted(name for name, module in sys.modules.items()
                  if module is not None and name.split(".")[0] in ABSENT)
