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
  (``benchmarks.bench_trace``); Prefect's task-run timeline, the MLflow parent run's tags and
  metrics (``model_loads``), and each step's child run: metrics (``peak_gpu_bytes``,
  ``model_loads``, ...), whether it was a cache hit, and its placement.
- ``floor``: what the hardware allows: the base's safetensors read once (64 MiB chunks), a pinned
  host-to-GPU copy, an 8192^3 BF16 matmul, and ``floor.write_bytes`` written and fsynced beside the
  exports (``floor.write_dir``).

Every stage but ``flow`` imports the steps' plain functions without Prefect
(``benchmarks.plain_steps``): the baseline is a plain ModelOpt script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from benchmarks import plain_steps


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
    plain_steps.install()
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
    cache, so the stages after this one (baseline and flow alike) start with the same warm cache.
    The driver may point it at a checkpoint of fewer layers at the same widths (same kernels)."""
    plain_steps.install()
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
    plain_steps.install()
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
    out["weights_gpu_bytes"] = float(torch.cuda.memory_allocated()) if device.type == "cuda" else None

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
    out["image_tokens"] = sum(stats.get("image_tokens", 0) for _, stats in loops.values())
    out["orchestrators_imported"] = plain_steps.orchestrators_imported()
    out["work_seconds"] = sum(p["seconds"] for p in phases.values())
    out["export_bytes"] = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    out["model_loads"] = 1
    return out


def flow(spec: dict[str, Any], gpus: int = 1) -> dict[str, Any]:
    """One run of the quantize flow; the driver's environment points it at its Prefect server.

    ``gpus`` > 1: ``calibration_gpus`` = ``gpus`` with each branch in ``gpus`` shards (one call per
    GPU, each with a share of both branches; the workers preload while the reference runs); the
    driver sets ``CUDA_VISIBLE_DEVICES`` to that many GPUs and this creates their Prefect limits
    ``gpu-<i>``. On CUDA, every GPU's utilisation and memory are sampled through the run
    (``benchmarks.gpu_sampler``): ``gpu_samples`` and, per GPU over the calibration stage,
    ``calibration_gpu_utilisation``.
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
        profile = profile.model_copy(update={
            "calibration_gpus": gpus, "text": profile.text.model_copy(update={"shards": gpus}),
            "image_text": profile.image_text.model_copy(update={"shards": gpus}) if profile.image_text else None})
        ensure_gpu_limits(os.environ["CUDA_VISIBLE_DEVICES"])
    runner = quantize.task_runner
    traced_flow = quantize.with_options(task_runner=runner)
    first = len(bench_trace.read(trace))
    from benchmarks.gpu_sampler import GpuSampler, utilisation

    sampler = GpuSampler() if spec["device"] == "cuda" else contextlib.nullcontext()
    with sampler:
        started_at, start = time.time(), time.perf_counter()
        state = traced_flow(profile, return_state=True)
        wall = time.perf_counter() - start
    result = state.result()
    tracking = _profile(spec).tracking_uri
    task_runs = _task_runs(str(state.state_details.flow_run_id))
    calibrating = [r for r in task_runs if r["task"].startswith("calibrate") and r["start"] and r["end"]]
    samples = getattr(sampler, "samples", [])
    return {
        "gpus": gpus,
        "gpu_sampler": getattr(sampler, "source", "none (device is not cuda)"),
        "gpu_samples": samples,
        "calibration_gpu_utilisation": utilisation(samples, min(r["start"] for r in calibrating),
                                                   max(r["end"] for r in calibrating)) if calibrating else {},
        "imports_seconds": imports,
        "started_at": started_at,
        "wall_seconds": wall,
        "task_runner": type(runner).__name__,
        "cached": result["cached"],
        "checkpoint": result["checkpoint"],
        "mlflow_run_id": result["mlflow_run_id"],
        "task_runs": task_runs,
        "trace": bench_trace.read(trace)[first:],
        "mlflow_tags": _mlflow_tags(tracking, result["mlflow_run_id"]),
        "placement": profile.placement.model_dump(),
        **_mlflow_records(tracking, result["mlflow_run_id"]),
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


def _mlflow_records(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The parent run's metrics and, per step (child run), its metrics and what it says of itself.

    ``step_metrics``: step -> metrics (``peak_gpu_bytes``, ``model_loads``, ``tokens``...; a cache hit's
    child carries the metrics of the run that computed it); ``step_info``: step -> ``cached`` (the
    child's tag) and ``placement`` (its param or tag of that name, else the ``placement`` in the
    meta of the artifact its ``artifact.uri`` names, on a local store); ``parent_metrics``: the
    parent's metrics (``model_loads``: models read by the steps that ran).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    metrics, info = {}, {}
    for run in children:
        step = run.data.tags.get("quantdag.step", run.info.run_name)
        metrics[step] = dict(run.data.metrics)
        fields = {**run.data.tags, **run.data.params}
        placement = next((v for k, v in fields.items() if k.rsplit(".", 1)[-1] == "placement"), None)
        info[step] = {"cached": fields.get("cached") == "true",
                      "placement": placement or _artifact_meta(fields.get("artifact.uri")).get("placement")}
    return {"step_metrics": metrics, "step_info": info, "parent_metrics": dict(parent.data.metrics)}


def _artifact_meta(uri: str | None) -> dict[str, Any]:
    """The ``meta`` of a stored artifact's ``MANIFEST.json`` (local stores; {} otherwise)."""
    path = Path(uri.removeprefix("file://")) / "MANIFEST.json" if uri and "://" not in uri.removeprefix("file://") else None
    try:
        return json.loads(path.read_text()).get("meta", {}) if path else {}
    except (OSError, ValueError):
        return {}


def floor(spec: dict[str, Any]) -> dict[str, Any]:
    """What the hardware allows for the work a run must do (see module docstring); the report turns
    these rates into the physical floor of a run: weights read, calibration FLOPs, export written.

    ``spec["floor"]``: ``read_bytes`` (cap on the base bytes read; None: all), ``write_bytes``,
    ``write_dir`` (on the disk the exports go to), ``matmul`` (square size; 8192 on a GPU).
    """
    device = torch.device(spec["device"])
    settings = spec.get("floor", {})
    out: dict[str, Any] = {"device": str(device)}
    files = sorted(Path(spec["profile"]["base"]["local_dir"]).glob("*.safetensors"))
    out["base_bytes"] = float(sum(f.stat().st_size for f in files))
    out["read"] = _read_rate(files, settings.get("read_bytes"))
    if device.type == "cuda":
        out["h2d"] = _h2d_rate(device)
        out["gpu_name"] = torch.cuda.get_device_name(device)
    out["matmul"] = _matmul_rate(device, int(settings.get("matmul") or (8192 if device.type == "cuda" else 1024)))
    write_dir = Path(settings["write_dir"]) if settings.get("write_dir") else Path(spec["stage_store"]).parent
    out["write"] = _write_rate(write_dir, int(settings.get("write_bytes") or 4 * 2**30))
    return out


def _read_rate(files: list[Path], cap: float | None, chunk: int = 64 << 20) -> dict[str, float]:
    """Read ``files`` once (or their first ``cap`` bytes) in ``chunk`` pieces into one buffer."""
    buffer, done, start = bytearray(chunk), 0, time.perf_counter()
    view = memoryview(buffer)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while (cap is None or done < cap) and (got := handle.readinto(view)):
                done += got
    seconds = time.perf_counter() - start
    return {"bytes": float(done), "seconds": seconds, "bytes_per_second": done / seconds if seconds else 0.0}


def _h2d_rate(device: torch.device, size: int = 1 << 30, repeats: int = 4) -> dict[str, float]:
    """Pinned host memory to the GPU, ``repeats`` copies of ``size`` bytes after one untimed copy."""
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    target = torch.empty(size, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(host, non_blocking=True)
    _sync(device)
    seconds = time.perf_counter() - start
    del host, target
    torch.cuda.empty_cache()
    return {"bytes": float(size * repeats), "seconds": seconds, "bytes_per_second": size * repeats / seconds}


def _matmul_rate(device: torch.device, n: int, warm: int = 3, repeats: int = 10) -> dict[str, float]:
    """Dense matmul rate (FLOP/s) of n x n x n products on random data: BF16 on a GPU, float32 on a CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warm):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = time.perf_counter() - start
    return {"n": float(n), "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "flops_per_second": 2.0 * n**3 * repeats / seconds}


def _write_rate(directory: Path, total: int, chunk: int = 64 << 20) -> dict[str, float]:
    """Write ``total`` bytes of random data to a file in ``directory`` and fsync it; the file is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    path, data = directory / "floor-write.tmp", os.urandom(chunk)
    start = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as handle:
            done = 0
            while done < total:
                done += handle.write(data[:min(chunk, total - done)])
            buffered = time.perf_counter() - start
            os.fsync(handle.fileno())
        seconds = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return {"bytes": float(done), "seconds": seconds, "bytes_per_second": done / seconds,
            "buffered_bytes_per_second": done / buffered if buffered else 0.0, "directory": str(directory)}


STAGES = {"warmup": warmup, "floor": floor, "calibration": calibration, "monolithic": monolithic, "flow": flow,
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
