"""Record what the quantize flow's steps do, in whichever process runs them (benchmark only).

:func:`install` wraps, by module attribute, the plain step functions that the Prefect tasks call
(``tasks.reference.bf16_reference``, ``tasks.calibrate.calibrate``, ``tasks.export.export_checkpoint``,
...) and the two model loaders (``quantdag.model.loading.load_model``,
``quantdag.format.reader.load_nvfp4_model``). Each
call appends one JSON line to the trace file: what ran, in which process, for how long, and for
steps the peak GPU memory the process allocated meanwhile. Task bodies and their cache keys are
untouched (Prefect hashes the task functions, which look the step functions up at call time).

Give :func:`install` to ``ProcessPoolTaskRunner(initializer=install, initargs=(path,))`` so
every worker process records too.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

STEPS = {
    "tasks.fetch": ("fetch_image_text", "fetch_text"),
    "tasks.calibrate": ("calibrate",),
    "tasks.merge": ("merge_amax",),
    "tasks.export": ("export_checkpoint",),
    "tasks.audit": ("audit_checkpoint",),
    "tasks.evaluate": ("evaluate",),
    "tasks.reference": ("bf16_reference",),
}
LOADERS = {"quantdag.model.loading": "load_model", "quantdag.format.reader": "load_nvfp4_model"}
_MARK = "__bench_trace__"


def _emit(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:  # one short append per record
        handle.write(json.dumps(record) + "\n")


def _cuda() -> Any:
    import torch

    return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _wrap(fn: Callable[..., Any], event: str, path: Path) -> Callable[..., Any]:
    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        cuda = _cuda()
        if cuda is not None and event == "step":
            cuda.reset_peak_memory_stats()
        start, wall = time.perf_counter(), time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            cuda = _cuda()
            record = {"event": event, "name": fn.__name__, "pid": os.getpid(), "start": wall,
                      "seconds": time.perf_counter() - start}
            if cuda is not None:
                record["peak_gpu_bytes"] = cuda.max_memory_allocated()
                record["gpu_bytes"] = cuda.memory_allocated()
                record["gpu_reserved_bytes"] = cuda.memory_reserved()  # kept by this process's allocator
            if event == "load" and args:
                record["dtype"] = str(kwargs.get("dtype", args[2] if len(args) > 2 else "bfloat16"))
            _emit(path, record)

    setattr(traced, _MARK, True)
    return traced


def install(path: str) -> None:
    """Wrap the step functions and loaders of this process; records go to ``path`` (JSON lines)."""
    trace = Path(path)
    for module_name, names in STEPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            fn = getattr(module, name)
            if not getattr(fn, _MARK, False):
                setattr(module, name, _wrap(fn, "step", trace))
    for module_name, name in LOADERS.items():
        module = importlib.import_module(module_name)
        fn = getattr(module, name)
        if not getattr(fn, _MARK, False):
            setattr(module, name, _wrap(fn, "load" if name == "load_model" else "load_export", trace))


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a trace file, in the order they were written."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
