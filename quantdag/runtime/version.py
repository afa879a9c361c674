"""The code version that every cached task takes as an explicit input.

Prefect's ``TASK_SOURCE`` cache policy hashes only a task function's own body, not the helpers it
calls, so a fix in ``quantdag/`` or ``tasks/`` would otherwise reuse stale cached results. The
code version is a digest of every Python source file of the packages that compute results; any
change to them invalidates the caches (conservatively).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_PACKAGES = ("quantdag", "tasks", "conf")


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<12 hex digits of sha256 over the sources>``, e.g. ``0.1.0+3fa2c9d01b7e``."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]  # the checkout (quantdag/runtime/version.py)
    for package in _PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    try:
        release = version("quantdag")
    except PackageNotFoundError:
        release = "0+unknown"
    return f"{release}+{digest.hexdigest()[:12]}"
