"""Per-GPU utilisation of the calibration stage and the 2-GPU speedup line, on synthetic samples (no GPU)."""

from __future__ import annotations

import pytest

from benchmarks.bench_report import calibration_speedup
from benchmarks.gpu_sampler import parse_line, utilisation

T0 = 1_000.0


def test_nvidia_smi_lines_are_parsed_and_noise_is_skipped() -> None:
    assert parse_line("1, 87, 40210\n", T0) == {"t": T0, "gpu": "1", "util_pct": 87.0, "mem_mib": 40210.0}
    assert parse_line("0, [N/A], 10", T0) is None and parse_line("index, utilization.gpu", T0) is None


def test_utilisation_counts_only_the_window_per_gpu() -> None:
    samples = [{"t": T0 + i, "gpu": gpu, "util_pct": util, "mem_mib": 1000.0 * i}
               for i, (gpu, util) in enumerate([("0", 100), ("1", 0), ("0", 50), ("1", 80), ("0", 0), ("1", 90)])]
    per_gpu = utilisation(samples, T0 + 1, T0 + 4)
    assert per_gpu["0"] == {"mean_util_pct": 25.0, "busy_fraction": 0.5, "peak_mem_mib": 4000.0, "samples": 2}
    assert per_gpu["1"]["mean_util_pct"] == pytest.approx(40.0) and per_gpu["1"]["samples"] == 2
    assert utilisation(samples, T0 + 10, T0 + 11) == {}


def _run(calibrations: dict[str, tuple[float, float]], preloads: dict[str, tuple[float, float]], export_end: float,
         utilisation_: dict) -> dict:
    runs = [{"name": name, "task": name.rsplit("-", 1)[0], "start": T0 + a, "end": T0 + b, "seconds": b - a}
            for name, (a, b) in {**calibrations, **preloads}.items()]
    runs.append({"name": "export-1", "task": "export", "start": T0 + export_end - 5, "end": T0 + export_end,
                 "seconds": 5.0})
    return {"task_runs": runs, "trace": [], "started_at": T0, "calibration_gpu_utilisation": utilisation_}


def test_speedup_is_the_calibration_span_and_preloads_are_shown_apart() -> None:
    one = _run({"calibrate_image_text+text-1": (20, 58)}, {}, 90, {"0": {"mean_util_pct": 80.0}})
    two = _run({"calibrate_image_text[0]+text[0]-1": (20, 40), "calibrate_image_text[1]+text[1]-2": (21, 41)},
               {"preload_base-3": (2, 15)}, 72, {"0": {"mean_util_pct": 78.0}, "1": {"mean_util_pct": 75.0}})
    summary = calibration_speedup(one, two)
    assert summary["one_gpu_seconds"] == 38 and summary["two_gpu_seconds"] == 21
    assert summary["speedup"] == pytest.approx(38 / 21) and summary["target"] == 1.7
    assert summary["two_gpu_preloads"] == {"preload_base-3": 13}, "the preload is outside the stage and reported"
    assert summary["two_gpu_utilisation"]["1"]["mean_util_pct"] == 75.0
    assert (summary["one_gpu_through_export_seconds"], summary["two_gpu_through_export_seconds"]) == (90, 72)
