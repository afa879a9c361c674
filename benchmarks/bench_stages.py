"""The stages of ``benchmarks.gpu_flow_vs_monolithic``, each run in a process of its own.

    python -m benchmarks.bench_stages STAGE --spec SPEC.json --out RESULT.json

``SPEC.json`` (written by the driver) holds the profile, the device and the working paths.
Stages:

- ``calibration``: one model load; plain forward speed of both calibration loops, then max
  calibration three ways (ModelOpt as is; weight quantizers off during the loop; the fast
  statistics of ``quantdag.calibration.fast_max``), each branch re-calibrated from a clean slate and its
  amax compared bit for bit with ModelOpt's; the vision tower's share of the image-text loop.
- ``monolithic``: the baseline, one process, one load: ``mtq.quantize`` with the image-text and
  the text loop, then ``export_hf_checkpoint`` (with the ``mtp.*`` tensors and side files).
- ``flow``: ``flows.quantize.quantize`` against the driver's Prefect server, every step traced
  (``benchmarks.bench_trace``); Prefect's task-run timeline and the MLflow parent run's tags.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak(device: torch.device) -> float | None:
    return float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


@contextmanager
def _timed(out: dict[str, Any], key: str, device: torch.device) -> Iterator[None]:
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    yield
    _sync(device)
    out[key] = {"seconds": time.perf_counter() - start, "peak_gpu_bytes": _peak(device)}


def _profile(spec: dict[str, Any]) -> Any:
    from conf.schema import Profile

    return Profile.model_validate(spec["profile"])


def _inputs(spec: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
    """Base, rows and sources as the flow's fetch steps make them (in a store of the stage's own)."""
    from quantdag.model.loading import resolve_base
    from quantdag.runtime.store import ArtifactStore
    from tasks.fetch import fetch_image_text, fetch_text

    profile = _profile(spec)
    store = ArtifactStore(spec["stage_store"])
    sources = {"image_text": profile.image_text, "text": profile.text}
    rows = {"image_text": fetch_image_text(profile.image_text, store), "text": fetch_text(profile.text, store)}
    return resolve_base(profile.base), rows, sources, store


def _loops(base: Any, rows: dict[str, Any], sources: dict[str, Any], store: Any, device: torch.device,
           limit: int | None = None) -> dict[str, tuple[Callable[[torch.nn.Module], None], dict[str, float]]]:
    from tasks.calibrate import CALIBRATORS
    from tasks.fetch import read_rows

    loops = {}
    for kind, ref in rows.items():
        rows_dir, kind_rows = read_rows(store, ref)
        stats = {"rows": 0, "tokens": 0, "image_tokens": 0, "vision_forward_calls": 0, "vision_embeddings": 0}
        loops[kind] = (CALIBRATORS[kind](base, rows_dir, kind_rows[:limit], sources[kind], device, stats), stats)
    return loops


def _load(base: Any, device: torch.device) -> tuple[torch.nn.Module, float]:
    from quantdag.model import loading as modeling

    loaded = modeling.load_model(base, device)
    if device.type == "cpu":
        loaded.model.float()  # as the calibration steps do on a CPU
    return loaded.model, loaded.load_seconds


def _weights_once(loop: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
    """``loop`` with every collecting weight quantizer paused (ModelOpt computed weight amax before it)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    def paused(model: torch.nn.Module) -> None:
        weights = [q for name, q in model.named_modules() if isinstance(q, TensorQuantizer)
                   and name.endswith("weight_quantizer") and q._if_calib and not q._disabled]
        for quantizer in weights:
            quantizer.disable_calib()
        try:
            loop(model)
        finally:
            for quantizer in weights:
                quantizer.enable_calib()

    return paused


def calibration(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain forward vs three max-calibration variants on one model load (see module docstring)."""
    import modelopt.torch.quantization as mtq

    from conf.schema import RecipeSpec
    from quantdag.calibration.quantizer_state import collect_state
    from quantdag.calibration.recipe import build_quant_config
    from quantdag.calibration.fast_max import fast_max_loop

    device = torch.device(spec["device"])
    base, rows, sources, store = _inputs(spec)
    loops = _loops(base, rows, sources, store, device)
    warmup = _loops(base, rows, sources, store, device, limit=2)
    model, load_seconds = _load(base, device)
    weights = float(torch.cuda.memory_allocated()) if device.type == "cuda" else None
    out: dict[str, Any] = {"load_seconds": load_seconds, "weights_gpu_bytes": weights, "plain": {}, "variants": {}}
    with torch.no_grad():
        for loop, _ in warmup.values():
            loop(model)
        tokens = {}
        for kind, (loop, stats) in loops.items():
            before = stats["tokens"]
            times = []
            for _ in range(spec.get("repeats", 2)):
                record: dict[str, Any] = {}
                with _timed(record, "run", device):
                    loop(model)
                times.append(record["run"])
            tokens[kind] = (stats["tokens"] - before) / len(times)
            best = min(times, key=lambda r: r["seconds"])
            out["plain"][kind] = {**best, "tokens": tokens[kind], "tokens_per_second": tokens[kind] / best["seconds"]}
        out["vision_seconds"] = _vision_seconds(model, loops["image_text"][0], device)
    config = build_quant_config(RecipeSpec())
    first: dict[str, Any] = {}
    with _timed(first, "quantize", device):
        model = mtq.quantize(model, config, forward_loop=loops["text"][0])
    out["first_quantize_text"] = first["quantize"]
    reference: dict[str, dict[str, torch.Tensor]] = {}
    variants = {"modelopt": lambda loop: loop, "weights_once": _weights_once, "fast": fast_max_loop}
    for name, wrap in variants.items():
        out["variants"][name] = {}
        for kind, (loop, _) in loops.items():
            times = []
            for _ in range(spec.get("repeats", 2)):
                times.append(_timed_recalibration(model, config, wrap(loop), device))
            amax = collect_state(model)["amax"]
            reference.setdefault(kind, amax)
            differ = sorted(n for n in reference[kind] if not torch.equal(reference[kind][n], amax.get(n, torch.empty(0))))
            best = min(times, key=lambda r: r["seconds"])
            out["variants"][name][kind] = {
                **best, "tokens_per_second": tokens[kind] / best["seconds"],
                "vs_plain": out["plain"][kind]["seconds"] / best["seconds"],
                "amax_equal_to_modelopt": not differ, "amax_differing": differ[:10], "quantizers": len(amax)}
    out["steady_state"] = _steady_state(model, config, loops, out["plain"], {"modelopt": variants["modelopt"],
                                                                             "fast": variants["fast"]}, device)
    out["profile_fast_text"] = _profile_pass(model, config, fast_max_loop(loops["text"][0]), device)
    return out


def _timed_recalibration(model: torch.nn.Module, config: dict[str, Any], loop: Callable[[torch.nn.Module], None],
                         device: torch.device) -> dict[str, Any]:
    """Forget the model's amax, run ModelOpt's max calibration with ``loop``; its seconds and peak memory."""
    from quantdag.calibration.session import recalibrate, reset_calibration

    reset_calibration(model)
    record: dict[str, Any] = {}
    with _timed(record, "run", device):
        recalibrate(model, config["algorithm"], loop)
    return record["run"]


def _steady_state(model: torch.nn.Module, config: dict[str, Any], loops: dict[str, Any], plain: dict[str, Any],
                  variants: dict[str, Callable[..., Any]], device: torch.device, passes: int = 3) -> dict[str, Any]:
    """Per-pass cost of calibration once its fixed cost is paid: one calibration with ``passes`` passes
    over the rows against one with a single pass; the difference / (passes - 1) is the marginal pass
    (same rows again: the amax cannot change). Ratio = plain forward pass seconds / marginal seconds."""

    def repeated(loop: Callable[[torch.nn.Module], None], times: int) -> Callable[[torch.nn.Module], None]:
        def run(calibrated: torch.nn.Module) -> None:
            for _ in range(times):
                loop(calibrated)
        return run

    out: dict[str, Any] = {}
    for name, wrap in variants.items():
        out[name] = {}
        for kind, (loop, _) in loops.items():
            seconds = {}
            for times in (1, passes):
                seconds[times] = _timed_recalibration(model, config, wrap(repeated(loop, times)), device)["seconds"]
            marginal = (seconds[passes] - seconds[1]) / (passes - 1)
            out[name][kind] = {"one_pass_seconds": seconds[1], f"{passes}_pass_seconds": seconds[passes],
                               "marginal_pass_seconds": marginal, "fixed_seconds": seconds[1] - marginal,
                               "vs_plain": plain[kind]["seconds"] / marginal if marginal > 0 else None}
    return out


def _profile_pass(model: torch.nn.Module, config: dict[str, Any], loop: Callable[[torch.nn.Module], None],
                  device: torch.device) -> dict[str, Any]:
    """torch.profiler over one calibration: the operators that take the most device and host time."""
    from torch.profiler import ProfilerActivity, profile

    from quantdag.calibration.session import recalibrate, reset_calibration

    reset_calibration(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        recalibrate(model, config["algorithm"], loop)
        _sync(device)
    averages = prof.key_averages()
    by_device = sorted(averages, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True)[:15]
    by_host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "device_us": [(e.key, e.count, round(getattr(e, "self_device_time_total", 0.0))) for e in by_device],
        "host_us": [(e.key, e.count, round(e.self_cpu_time_total)) for e in by_host],
        "device_total_us": sum(getattr(e, "self_device_time_total", 0.0) for e in averages),
        "host_total_us": sum(e.self_cpu_time_total for e in averages),
    }


def _vision_seconds(model: torch.nn.Module, loop: Callable[[torch.nn.Module], None], device: torch.device) -> float:
    """Seconds the vision tower takes in one pass of the image-text loop (synchronised hooks)."""
    visual = model.model.visual
    spent = {"seconds": 0.0, "start": 0.0}

    def before(*_: Any) -> None:
        _sync(device)
        spent["start"] = time.perf_counter()

    def after(*_: Any) -> None:
        _sync(device)
        spent["seconds"] += time.perf_counter() - spent["start"]

    handles = [visual.register_forward_pre_hook(before), visual.register_forward_hook(after)]
    try:
        loop(model)
    finally:
        for handle in handles:
            handle.remove()
    return spent["seconds"]


def warmup(spec: dict[str, Any]) -> dict[str, Any]:
    """Run both loops once, plain and under max calibration, and discard the timings: the kernels
    that Triton compiles on first use (flash-linear-attention's, ModelOpt's) land in the on-disk
    cache, so the stages after this one (baseline and flow alike) start with the same warm cache."""
    import modelopt.torch.quantization as mtq

    from quantdag.calibration.fast_max import fast_max_loop
    from quantdag.calibration.recipe import build_quant_config

    start = time.perf_counter()
    device = torch.device(spec["device"])
    base, rows, sources, store = _inputs(spec)
    loops = _loops(base, rows, sources, store, device)
    model, _ = _load(base, device)

    def both(calibrated: torch.nn.Module) -> None:
        for loop, _ in loops.values():
            loop(calibrated)

    with torch.no_grad():
        both(model)
    mtq.quantize(model, build_quant_config(_profile(spec).recipe), forward_loop=fast_max_loop(both))
    _sync(device)
    return {"seconds": time.perf_counter() - start}


def monolithic(spec: dict[str, Any]) -> dict[str, Any]:
    """The baseline: load, ``mtq.quantize`` with both loops, export; one process, one load."""
    start = time.perf_counter()
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from quantdag.calibration.quantizer_state import collect_state, save_state
    from quantdag.calibration.recipe import build_quant_config
    from tasks.export import MTP_PREFIX, copy_side_files, read_mtp_tensors

    device = torch.device(spec["device"])
    out: dict[str, Any] = {"imports_seconds": time.perf_counter() - start, "phases": {}}
    phases = out["phases"]
    with _timed(phases, "prepare", device):
        base, rows, sources, store = _inputs(spec)
        loops = _loops(base, rows, sources, store, device)
    with _timed(phases, "load", device):
        model, _ = _load(base, device)

    def both(calibrated: torch.nn.Module) -> None:
        for loop, _ in loops.values():
            loop(calibrated)

    with _timed(phases, "calibrate", device):
        model = mtq.quantize(model, build_quant_config(_profile(spec).recipe), forward_loop=both)
    save_state(collect_state(model), Path(spec["monolithic_dir"]) / "state")  # for the amax comparison
    export_dir = Path(spec["monolithic_dir"]) / "export"
    with _timed(phases, "export", device):
        mtp = read_mtp_tensors(Path(base.source_dir))
        model._mtp_layer_prefixes = [MTP_PREFIX]
        with torch.no_grad():
            export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=export_dir, extra_state_dict=mtp or None)
        copy_side_files(base, export_dir)
    out["tokens"] = {kind: stats["tokens"] for kind, (_, stats) in loops.items()}
    out["work_seconds"] = sum(p["seconds"] for p in phases.values())
    out["export_bytes"] = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    out["model_loads"] = 1
    return out


def flow(spec: dict[str, Any], gpus: int = 1) -> dict[str, Any]:
    """One run of the quantize flow; the driver's environment points it at its Prefect server.

    ``gpus`` > 1: ``calibration_gpus`` = ``gpus`` (each branch a task of its own, one GPU each);
    the driver sets ``CUDA_VISIBLE_DEVICES`` to that many GPUs and this creates their Prefect
    limits ``gpu-<i>``.
    """
    start = time.perf_counter()
    from benchmarks import bench_trace
    from flows.quantize import quantize
    from quantdag.runtime.deploy import ensure_gpu_limits

    imports = time.perf_counter() - start
    trace = Path(spec["trace"])
    bench_trace.install(str(trace))
    profile = _profile(spec)
    if gpus > 1:
        profile = profile.model_copy(update={"calibration_gpus": gpus})
        ensure_gpu_limits(os.environ["CUDA_VISIBLE_DEVICES"])
    runner = quantize.task_runner
    traced_flow = quantize.with_options(task_runner=runner)
    first = len(bench_trace.read(trace))
    started_at, start = time.time(), time.perf_counter()
    state = traced_flow(profile, return_state=True)
    wall = time.perf_counter() - start
    result = state.result()
    tracking = _profile(spec).tracking_uri
    return {
        "imports_seconds": imports,
        "started_at": started_at,
        "wall_seconds": wall,
        "task_runner": type(runner).__name__,
        "cached": result["cached"],
        "checkpoint": result["checkpoint"],
        "mlflow_run_id": result["mlflow_run_id"],
        "task_runs": _task_runs(str(state.state_details.flow_run_id)),
        "trace": bench_trace.read(trace)[first:],
        "mlflow_tags": _mlflow_tags(tracking, result["mlflow_run_id"]),
        "step_metrics": _mlflow_children(tracking, result["mlflow_run_id"]),
    }


def _task_runs(flow_run_id: str) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(({
        "name": run.name, "task": run.name.rsplit("-", 1)[0],
        "state": run.state.name if run.state else None,
        "start": run.start_time.timestamp() if run.start_time else None,
        "end": run.end_time.timestamp() if run.end_time else None,
        "seconds": run.total_run_time.total_seconds() if run.total_run_time else 0.0,
    } for run in runs), key=lambda r: r["start"] or 0.0)


def _mlflow_tags(tracking_uri: str, run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith(("gpu.", "version.", "host."))}


def _mlflow_children(tracking_uri: str, run_id: str) -> dict[str, dict[str, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    return {run.data.tags.get("quantdag.step", run.info.run_name): dict(run.data.metrics) for run in children}


STAGES = {"warmup": warmup, "calibration": calibration, "monolithic": monolithic, "flow": flow,
          "flow_2gpu": lambda spec: flow(spec, gpus=2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one stage of benchmarks.gpu_flow_vs_monolithic")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    result = STAGES[args.stage](spec)
    result["pid"] = os.getpid()
    args.out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
