"""What a model step cost: peak GPU memory, peak host memory (RSS) and how many models it loaded.

:func:`step_meter` resets the peaks when a step starts and reads them when it ends:

- ``peak_gpu_bytes``: the most bytes of tensors the step held at once on any one GPU
  (``torch.cuda.max_memory_allocated``), and ``peak_gpu_reserved_bytes``: the same for what the
  caching allocator reserved (what ``nvidia-smi`` shows, less the CUDA context);
- ``peak_rss_bytes``: the process's peak resident set (``VmHWM`` of ``/proc/self/status``), reset
  at the start by writing ``5`` to ``/proc/self/clear_refs`` (Linux, ``proc(5)``); where that is
  not possible it is the process's peak so far (``resource.getrusage``), an upper bound;
- ``model_loads``: models read from files during the step
  (:func:`quantdag.model.loading.count_model_load`, called by every loader).

Model steps run one at a time per process, so the figures belong to the step that is running.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from quantdag.model.loading import model_loads

def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepMeter:
    """Figures of one step; read :meth:`record` after the ``with`` body (see :func:`step_meter`)."""

    def __init__(self) -> None:
        self._loads_at_start = model_loads()
        self.figures: dict[str, float] = {}

    def record(self) -> dict[str, float]:
        """``peak_gpu_bytes``, ``peak_gpu_reserved_bytes``, ``peak_rss_bytes``, ``model_loads`` (so far)."""
        figures = {"model_loads": float(model_loads() - self._loads_at_start), "peak_rss_bytes": float(_rss_peak_bytes())}
        if torch.cuda.is_available():
            devices = range(torch.cuda.device_count())
            figures["peak_gpu_bytes"] = float(max(torch.cuda.max_memory_allocated(d) for d in devices))
            figures["peak_gpu_reserved_bytes"] = float(max(torch.cuda.max_memory_reserved(d) for d in devices))
        else:
            figures["peak_gpu_bytes"] = 0.0
        self.figures = figures
        return figures


@contextmanager
def step_meter() -> Iterator[StepMeter]:
    """Measure the body as one step; the figures are in ``meter.figures`` afterwards (also on error)."""
    if torch.cuda.is_available():
        torch.cuda.init()  # the caching allocator refuses a reset ("Invalid device argument") before CUDA's lazy init
        for device in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(device)
    _reset_rss_peak()
    meter = StepMeter()
    try:
        yield meter
    finally:
        meter.record()
