"""Scan step: refuse a base whose weights hold NaN or infinite values, before any model loads.

Reads the base's safetensors files one tensor at a time (:func:`quantdag.format.scan.nonfinite_tensors`)
and fails naming every damaged tensor. Cached on the base's identity (Hub commit sha, or the
local files' names, sizes and mtimes), so a base is scanned once. A GGUF base has no safetensors
to read; it is skipped here (scan the loaded model with
:func:`quantdag.format.scan.find_nonfinite_weights`).
"""

from __future__ import annotations

import time
from typing import Any

from quantdag.format.scan import require_finite
from quantdag.model.loading import BaseRef
from quantdag.runtime.prefect_task import quantdag_task


def scan_base(base: BaseRef) -> dict[str, Any]:
    """Check every floating-point weight of the base for NaN and inf.

    Returns:
        ``{"tensors": scanned, "seconds": elapsed}``; ``tensors`` is 0 for a GGUF base (skipped).

    Raises:
        ValueError: a tensor holds NaN or inf (one line naming each, up to 10, and the fix), or a
            safetensors file of the base is missing or malformed (names it).
    """
    if base.gguf_file:
        return {"tensors": 0, "seconds": 0.0}
    start = time.perf_counter()
    label = f"base {base.repo_id}@{base.revision_sha}" if base.repo_id else f"base {base.source_dir}"
    scanned = require_finite(base.source_dir, label)
    return {"tensors": scanned, "seconds": round(time.perf_counter() - start, 3)}


@quantdag_task("scan_base")
def scan_base_task(base: BaseRef, code_version: str) -> dict[str, Any]:
    """Prefect wrapper of :func:`scan_base` (cached on the base's identity and the code version)."""
    return scan_base(base)
