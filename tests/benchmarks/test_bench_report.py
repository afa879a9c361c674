"""The GPU benchmark's bookkeeping on synthetic stage results (no model, no GPU)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from benchmarks import bench_trace
from benchmarks.bench_report import (calibration_ratios, checkpoint_bytes, extrapolate, flow_model_loads,
                                    linear_parameters, peak_checks, physical_floor, report, step_table, summarize)

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
    assert (rows["evaluate"]["trace_loads"], rows["evaluate"]["export_reads"]) == (1, 1)
    assert rows["evaluate"]["model_loads"] == 2, "without MLflow figures, models read = base loads + export reads"
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


GIB = 1 << 30


def _budget_flow(peaks: dict[str, tuple[float, float]], budget: float | None) -> dict:
    """A flow run whose steps logged MLflow figures: step -> (peak allocated, peak reserved)."""
    flow = _flow()
    flow["trace"] = []  # figures come from the MLflow children alone
    flow["step_metrics"] = {
        "bf16_reference": {"model_loads": 1.0, "peak_gpu_bytes": peaks["bf16_reference"][0],
                           "peak_gpu_reserved_bytes": peaks["bf16_reference"][1], "weight_bytes": 50 * GIB},
        "calibrate_image_text": {"model_loads": 0.0, "tokens": 3000.0, "calibrate_seconds": 2.0,
                                 "peak_gpu_bytes": peaks["calibrate"][0], "peak_gpu_reserved_bytes": peaks["calibrate"][1]},
        "calibrate_text": {"model_loads": 0.0, "tokens": 1000.0, "calibrate_seconds": 1.0,
                           "peak_gpu_bytes": peaks["calibrate"][0], "peak_gpu_reserved_bytes": peaks["calibrate"][1]},
        "export": {"model_loads": 0.0, "peak_gpu_bytes": peaks["export"][0], "peak_gpu_reserved_bytes": peaks["export"][1]},
        "evaluate": {"model_loads": 1.0, "peak_gpu_bytes": peaks["evaluate"][0], "peak_gpu_reserved_bytes": peaks["evaluate"][1]},
    }
    flow["step_info"] = {name: {"cached": False, "placement": "cuda:0 whole" if budget is None else "spread from cuda:0"}
                         for name in flow["step_metrics"]}
    flow["task_runs"] = [{"task": "bf16_reference", "state": "Completed", "start": T0, "end": T0 + 1.8, "seconds": 1.8},
                         *flow["task_runs"]]
    flow["parent_metrics"] = {"model_loads": 2.0}
    flow["placement"] = {"memory_budget_gib": budget, "reserve_fraction": 0.2, "gpus": 1}
    return flow


def test_steps_read_peaks_and_loads_from_mlflow_children() -> None:
    flow = _budget_flow({"bf16_reference": (52e9, 53e9), "calibrate": (56e9, 58e9), "export": (57e9, 60e9),
                         "evaluate": (20e9, 21e9)}, budget=None)
    rows = {row["step"]: row for row in step_table(flow)}
    assert rows["calibrate_image_text+text"]["peak_gpu_bytes"] == 56e9 and rows["calibrate_image_text+text"]["model_loads"] == 0
    assert rows["bf16_reference"]["model_loads"] == 1 and rows["bf16_reference"]["loads_from"] == "mlflow"
    assert rows["evaluate"]["peak_gpu_reserved_bytes"] == 21e9 and rows["audit"]["loads_from"] == "trace"
    assert flow_model_loads(flow) == 2
    cached = {**flow, "step_info": {name: {"cached": True, "placement": None} for name in flow["step_metrics"]},
              "task_runs": [{**run, "state": "Cached"} for run in flow["task_runs"]], "parent_metrics": {"model_loads": 0.0}}
    for row in step_table(cached):
        assert row["model_loads"] == 0 and row["peak_gpu_bytes"] is None, "a cache hit loads nothing and has no peak"
    assert flow_model_loads(cached) == 0


def test_peaks_against_the_budget_and_against_the_weights() -> None:
    budgeted = _budget_flow({"bf16_reference": (30 * GIB, 31 * GIB), "calibrate": (31 * GIB, 33 * GIB),
                             "export": (20 * GIB, 25 * GIB), "evaluate": (29 * GIB, 30 * GIB)}, budget=32.0)
    checks = peak_checks(budgeted, weight_bytes=1.0)
    verdict = {c["step"]: c.get("ok") for c in checks["steps"]}
    assert checks["limit_bytes"] == 32 * GIB and checks["limit"] == "budget 32 GiB"
    assert verdict["calibrate_image_text+text"] is False, "reserved bytes above the budget fail the check"
    assert verdict["bf16_reference"] and verdict["export"] and verdict["evaluate"] and checks["all_ok"] is False
    assert verdict["audit"] is None, "a step without a GPU peak is listed, not checked"
    plain = _budget_flow({"bf16_reference": (52e9, 53e9), "calibrate": (56e9, 70e9), "export": (62e9, 63e9),
                          "evaluate": (20e9, 21e9)}, budget=None)
    checks = peak_checks(plain, weight_bytes=1.0)
    assert checks["weight_bytes"] == 50 * GIB, "the placement's logged weight bytes win over the fallback"
    assert checks["limit_bytes"] == pytest.approx(1.15 * 50 * GIB)
    verdict = {c["step"]: c.get("ok") for c in checks["steps"]}
    assert verdict["calibrate_image_text+text"], "without a budget only allocated bytes count against 1.15x weights"
    assert verdict["export"] is False and checks["all_ok"] is False  # 62e9 > 1.15 * 53.7e9


def _floor_results() -> dict:
    floor = {"device": "cuda:0", "gpu_name": "test GPU", "base_bytes": 55e9,
             "read": {"bytes_per_second": 5e9}, "h2d": {"bytes_per_second": 25e9},
             "matmul": {"flops_per_second": 790e12}, "write": {"bytes_per_second": 2e9}}
    mono = {"work_seconds": 200.0, "process_seconds": 240.0, "model_loads": 1, "export_bytes": 20e9,
            "tokens": {"image_text": 150_000, "text": 50_000}, "image_tokens": 70_000,
            "phases": {"prepare": {"seconds": 20.0, "peak_gpu_bytes": None}, "load": {"seconds": 20.0, "peak_gpu_bytes": 55e9},
                       "calibrate": {"seconds": 60.0, "peak_gpu_bytes": 60e9}, "export": {"seconds": 100.0, "peak_gpu_bytes": 58e9}}}
    return {"floor": floor, "monolithic": mono}


def test_physical_floor_arithmetic() -> None:
    results = _floor_results()
    params = linear_parameters(4, tiny=True)
    floor = physical_floor(results, 4, tiny=True)
    parts = floor["parts"]
    assert parts["weights_read"]["seconds"] == pytest.approx(55e9 / 5e9), "the slower of disk read and host-to-GPU"
    flops = 2 * (params["language"] * 200_000 + params["vision"] * 70_000 * 4 + params["merger"] * 70_000)
    assert parts["calibration"]["flops"] == pytest.approx(flops)
    assert parts["calibration"]["seconds"] == pytest.approx(flops / 790e12)
    assert parts["export_write"]["seconds"] == pytest.approx(10.0)
    assert floor["seconds"] == pytest.approx(11.0 + 10.0 + flops / 790e12)
    run = floor["runs"]["baseline process"]
    assert run["vs_floor"] == pytest.approx(240.0 / floor["seconds"])
    assert "55.00 GB / 5.00 GB/s read = 11.0 s" in parts["weights_read"]["arithmetic"]
    assert "20.00 GB / 2.00 GB/s written (fsync) = 10.0 s" in parts["export_write"]["arithmetic"]
    assert physical_floor({"monolithic": results["monolithic"]}, 4, tiny=True) is None, "no floor without measured rates"


def test_linear_parameters_grow_with_decoder_layers_only() -> None:
    four, eight = linear_parameters(4, tiny=True), linear_parameters(8, tiny=True)
    assert eight["language"] == pytest.approx(2 * four["language"]) and four["language"] > 0
    assert eight["vision"] == four["vision"] > 0 and eight["merger"] == four["merger"] > 0


def test_report_prints_every_run_the_budget_check_and_the_floor() -> None:
    results = _floor_results()
    results["flow_cold"] = _budget_flow({"bf16_reference": (10e9, 11e9), "calibrate": (12e9, 13e9), "export": (11e9, 12e9),
                                         "evaluate": (5e9, 6e9)}, budget=None)
    results["flow_budget"] = _budget_flow({"bf16_reference": (10e9, 11e9), "calibrate": (40 * GIB, 41 * GIB),
                                           "export": (11e9, 12e9), "evaluate": (5e9, 6e9)}, budget=32.0)
    summary = summarize(results, None, argparse.Namespace(layers=4, tiny=True))
    text = report(summary, results)
    assert "flow (cold): wall 52.0 s" in text and "flow (budget)" in text and "budget 32 GiB" in text
    assert "| flow (budget) calibrate_image_text+text: peak GPU" in text and "OVER" in text
    assert "physical floor (test GPU" in text and "x floor" in text and "flow (budget) process, end to end" in text
    assert summary["runs"]["flow_budget"]["peaks"]["all_ok"] is False
    assert summary["runs"]["flow_cold"]["peaks"]["all_ok"] is True
    assert "extrapolated" in summary and "extrapolated" not in summarize(results, None, argparse.Namespace(layers=64, tiny=True))


def test_results_of_separate_parts_merge(tmp_path: Path) -> None:
    from benchmarks.gpu_flow_vs_monolithic import load_results

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"monolithic": {"work_seconds": 1.0}, "failed": {"flow_cold": "boom"}}))
    second.write_text(json.dumps({"flow_cold": {"wall_seconds": 2.0}, "failed": {"flow_budget": "oom"}}))
    merged = load_results([first, second, tmp_path / "missing.json"])
    assert merged["monolithic"] == {"work_seconds": 1.0} and merged["flow_cold"] == {"wall_seconds": 2.0}
    assert merged["failed"] == {"flow_budget": "oom"}, "a stage that succeeded later is no longer failed"


def test_pool_fill_tiles_one_pool_and_keeps_the_other_tensors(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from benchmarks.build_model import normal_pool, pool_tensor, write_pool_safetensors
    from quantdag.demo.weights import TensorSpec, make_tensor

    specs = [TensorSpec("a.weight", (37, 50), "normal"), TensorSpec("a.norm.weight", (50,), "zeros"),
             TensorSpec("b.A_log", (7,), "a_log"), TensorSpec("b.weight", (3, 1000), "normal"),
             TensorSpec("c.dt_bias", (5,), "ones")]
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one = write_pool_safetensors(tmp_path / "one", specs, seed=3, max_shard_bytes=1 << 30, pool_values=1000)
    many = write_pool_safetensors(tmp_path / "many", specs, seed=3, max_shard_bytes=4000, pool_values=1000)
    assert [p.name for p in one] == ["model.safetensors"] and len(many) > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {s.name for s in specs}
    assert index["metadata"]["total_size"] == sum(2 * math.prod(s.shape) for s in specs)
    pool = normal_pool(3, 1000)
    for layout in ("one", "many"):
        tensors = {}
        for path in (tmp_path / layout).glob("*.safetensors"):
            with safe_open(str(path), "pt") as handle:
                tensors |= {name: handle.get_tensor(name) for name in handle.keys()}
        for spec in specs:
            expected = (pool_tensor(pool, 3, spec.name, spec.shape) if spec.init == "normal"
                        else make_tensor(spec, 3, torch.bfloat16))
            assert tensors[spec.name].dtype == torch.bfloat16 and torch.equal(tensors[spec.name], expected), spec.name
    assert float(pool.float().std()) == pytest.approx(0.02, rel=0.1)


def test_plain_steps_import_without_prefect_or_mlflow() -> None:
    import subprocess
    import sys

    code = ("from benchmarks import plain_steps; assert plain_steps.install()\n"
            "import importlib.util, tasks.fetch, tasks.calibrate, tasks.export\n"
            "from quantdag.runtime.progress import Progress\n"
            "with Progress('rows', 1) as bar: bar.update()\n"
            "assert importlib.util.find_spec('prefect') is None and importlib.util.find_spec('mlflow') is None\n"
            "assert plain_steps.orchestrators_imported() == [], plain_steps.orchestrators_imported()\n"
            "import types; assert isinstance(tasks.calibrate.calibrate_task, types.FunctionType)\n")
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
