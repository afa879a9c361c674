"""Per-GPU utilisation and memory over a benchmark stage, sampled from ``nvidia-smi`` in the background.

    with GpuSampler() as sampler:      # nvidia-smi -lms 250, one line per GPU per sample
        run_the_stage()
    per_gpu = utilisation(sampler.samples, start, end)   # {"0": {"mean_util_pct": ..., ...}, "1": {...}}

``utilization.gpu`` is the percentage of the sample period in which a kernel ran (NVIDIA's
definition, ``nvidia-smi --help-query-gpu``): a GPU that waits for its worker's imports or model
load reads 0 while it waits. Without ``nvidia-smi`` the samples come from
``torch.cuda.utilization`` (the same NVML counter) in a thread of this process.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

QUERY = "index,utilization.gpu,memory.used"


def parse_line(line: str, now: float) -> dict[str, Any] | None:
    """One ``nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits`` line
    -> ``{"t": unix seconds, "gpu": "0", "util_pct": float, "mem_mib": float}``; None for anything else."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        return {"t": now, "gpu": parts[0], "util_pct": float(parts[1]), "mem_mib": float(parts[2])}
    except ValueError:  # "[N/A]", a header, a warning line
        return None


class GpuSampler:
    """Context manager collecting per-GPU samples every ``interval`` seconds into :attr:`samples`.

    Args:
        interval: seconds between samples (nvidia-smi's ``-lms``, at least 0.05).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = max(interval, 0.05)
        self.samples: list[dict[str, Any]] = []
        self.source = "none"
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> GpuSampler:
        binary = shutil.which("nvidia-smi")
        if binary:
            self.source = "nvidia-smi"
            self._process = subprocess.Popen(
                [binary, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"-lms={int(self.interval * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        self._thread.start()
        return self

    def _read_smi(self) -> None:
        for line in self._process.stdout:
            sample = parse_line(line, time.time())
            if sample is not None:
                self.samples.append(sample)

    def _poll_torch(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        while not self._stop.wait(self.interval):
            now = time.time()
            for index in range(torch.cuda.device_count()):
                try:
                    util = float(torch.cuda.utilization(index))
                    free, total = torch.cuda.mem_get_info(index)
                except Exception:  # noqa: BLE001 - no NVML (pynvml) on this host: no samples, said by source
                    self.source = "none (torch.cuda.utilization needs pynvml)"
                    return
                self.samples.append({"t": now, "gpu": str(index), "util_pct": util, "mem_mib": (total - free) / 2**20})

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)


def utilisation(samples: list[dict[str, Any]], start: float | None = None, end: float | None = None) -> dict[str, Any]:
    """Per GPU over ``[start, end]`` (unix seconds; None: all samples): mean and busy share of ``util_pct``, peak memory.

    Returns:
        GPU index -> ``{"mean_util_pct", "busy_fraction" (samples with util > 0), "peak_mem_mib", "samples"}``;
        empty when no sample falls in the window.
    """
    out: dict[str, Any] = {}
    for sample in samples:
        if (start is not None and sample["t"] < start) or (end is not None and sample["t"] > end):
            continue
        gpu = out.setdefault(sample["gpu"], {"sum": 0.0, "busy": 0, "peak_mem_mib": 0.0, "samples": 0})
        gpu["sum"] += sample["util_pct"]
        gpu["busy"] += sample["util_pct"] > 0
        gpu["peak_mem_mib"] = max(gpu["peak_mem_mib"], sample["mem_mib"])
        gpu["samples"] += 1
    return {index: {"mean_util_pct": g["sum"] / g["samples"], "busy_fraction": g["busy"] / g["samples"],
                    "peak_mem_mib": g["peak_mem_mib"], "samples": g["samples"]}
            for index, g in sorted(out.items())}
