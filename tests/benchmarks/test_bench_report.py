"""The GPU benchmark's bookkeeping on synthetic stage results (no model, no GPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import bench_trace
from benchmarks.bench_report import calibration_ratios, checkpoint_bytes, extrapolate, step_table, summarize

T0 = 1_000.0


def _flow() -> dict:
    trace = [
        {"event": "step", "name": "calibrate", "pid": 7, "start": T0 + 2, "seconds": 10.0, "peak_gpu_bytes": 12e9},
        {"event": "load", "name": "load_model", "pid": 7, "start": T0 + 2.5, "seconds": 3.0},
        {"event": "step", "name": "export_checkpoint", "pid": 8, "start": T0 + 13, "seconds": 20.0, "peak_gpu_bytes": 11e9},
        {"event": "load", "name": "load_model", "pid": 8, "start": T0 + 13.5, "seconds": 2.0},
        {"event": "step", "name": "evaluate", "pid": 7, "start": T0 + 34, "seconds": 15.0, "peak_gpu_bytes": 30e9},
        {"event": "load", "name": "load_model", "pid": 7, "start": T0 + 34.5, "seconds": 4.0},
        {"event": "load_export", "name": "load_nvfp4_model", "pid": 7, "start": T0 + 39, "seconds": 5.0},
        {"event": "step", "name": "audit_checkpoint", "pid": 8, "start": T0 + 34, "seconds": 6.0},  # beside evaluate
    ]
    runs = [
        {"task": "calibrate_image_text+text", "state": "Completed", "start": T0 + 1.9, "end": T0 + 12.1, "seconds": 10.2},
        {"task": "export", "state": "Completed", "start": T0 + 12.9, "end": T0 + 33.1, "seconds": 20.2},
        {"task": "evaluate", "state": "Completed", "start": T0 + 33.9, "end": T0 + 49.1, "seconds": 15.2},
        {"task": "audit", "state": "Completed", "start": T0 + 33.9, "end": T0 + 40.1, "seconds": 6.2},
    ]
    metrics = {"calibrate_image_text": {"tokens": 3000.0, "calibrate_seconds": 2.0},
               "calibrate_text": {"tokens": 1000.0, "calibrate_seconds": 1.0}}
    return {"trace": trace, "task_runs": runs, "step_metrics": metrics, "started_at": T0, "wall_seconds": 52.0,
            "process_seconds": 60.0, "cached": {"export": False}, "mlflow_tags": {"gpu.name": "test"}}


def test_loads_belong_to_the_step_running_in_their_process() -> None:
    rows = {row["step"]: row for row in step_table(_flow())}
    assert rows["calibrate_image_text+text"]["model_loads"] == 1 and rows["export"]["model_loads"] == 1
    assert (rows["evaluate"]["model_loads"], rows["evaluate"]["export_reads"]) == (1, 1)
    assert rows["audit"]["model_loads"] == 0, "a load of the concurrent evaluate step must not count for audit"
    assert rows["calibrate_image_text+text"]["tokens_per_second"] == pytest.approx(4000 / 3)
    assert rows["evaluate"]["peak_gpu_bytes"] == 30e9


def test_summary_ratios_and_extrapolation() -> None:
    calibration = {"plain": {"image_text": {"seconds": 2.0}, "text": {"seconds": 1.0}}, "vision_seconds": 1.0,
                   "variants": {"fast": {"image_text": {"seconds": 2.5, "vs_plain": 0.8},
                                         "text": {"seconds": 1.0, "vs_plain": 1.0}}}}
    assert calibration_ratios(calibration)["fast"]["both"] == pytest.approx(3 / 3.5)
    mono = {"work_seconds": 40.0, "process_seconds": 50.0, "model_loads": 1, "tokens": {"image_text": 3000, "text": 1000},
            "phases": {"prepare": {"seconds": 2.0}, "load": {"seconds": 3.0}, "calibrate": {"seconds": 5.0},
                       "export": {"seconds": 30.0}}}
    cached = {**_flow(), "wall_seconds": 4.0, "cached": {"export": True}}
    results = {"calibration": calibration, "monolithic": mono, "flow_cold": _flow(), "flow_cached": cached}
    args = argparse.Namespace(layers=4, tiny=True)
    summary = summarize(results, Path("/nonexistent"), args)
    assert summary["flow_vs_baseline"] == pytest.approx(52 / 40)
    assert summary["flow_through_export_seconds"] == pytest.approx(33.1)
    assert summary["cached_vs_baseline"] == pytest.approx(0.1) and summary["flow_cached_all_hits"]
    assert (summary["flow_model_loads"], summary["flow_export_reads"]) == (3, 1)
    extra = extrapolate(results, 4, tiny=True)
    assert extra["bytes_ratio"] > 1 and extra["layer_ratio"] == 16
    assert extra["flow_cached_seconds"] == 4.0, "a cached rerun reads no model: it does not grow with layers"
    assert extra["monolithic_seconds"] > mono["work_seconds"]


def test_bytes_grow_with_decoder_layers_only() -> None:
    four, eight = checkpoint_bytes(4, tiny=True), checkpoint_bytes(8, tiny=True)  # 3 linear + 1 full attention each 4
    assert eight["decoder"] == pytest.approx(2 * four["decoder"])
    assert eight["total"] - eight["decoder"] == pytest.approx(four["total"] - four["decoder"])


def test_trace_records_wrapped_calls(tmp_path: Path) -> None:
    import quantdag.model.loading as modeling
    from quantdag.runtime import devices

    path = tmp_path / "trace.jsonl"
    original = devices.pick_device
    try:
        devices.pick_device = bench_trace._wrap(original, "step", path)
        assert devices.pick_device("cpu").type == "cpu"
    finally:
        devices.pick_device = original
    (record,) = bench_trace.read(path)
    assert record["name"] == "pick_device" and record["seconds"] >= 0 and json.dumps(record)
