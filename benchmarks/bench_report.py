"""Summary of ``benchmarks.gpu_flow_vs_monolithic``: per-run step tables, ratios, peak memory
against the budget, the physical floor, a 64-layer estimate.

Pure functions over the stages' JSON results (no model, no GPU), so they are tested on synthetic
results (``tests/benchmarks/test_bench_report.py``).
"""

from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path
from typing import Any

TARGETS = {"flow_vs_baseline": 1.05, "cached_vs_baseline": 0.02, "calibration_vs_plain": 0.9,
           "peak_vs_weights": 1.15, "run_vs_floor": 2.0, "calibration_2gpu_speedup": 1.7}
FLOW_RUNS = {"flow_cold": "flow (cold)", "flow_cached": "flow (cached)", "flow_budget": "flow (budget)"}
GIB = 1 << 30
STEP_FUNCTIONS = {"bf16_reference": "bf16_reference", "export": "export_checkpoint", "evaluate": "evaluate",
                  "audit": "audit_checkpoint", "merge_amax": "merge_amax", "fetch_text": "fetch_text",
                  "fetch_image_text": "fetch_image_text"}


def merged_state(workdir: Path, store: str = "artifacts") -> Path | None:
    """The flow's merged quantizer state in ``workdir/store`` (the state artifact that carries ``amax_table.json``)."""
    found = sorted((workdir / store / "objects" / "quantizer-state").glob("*/amax_table.json"))
    return found[0].parent / "quantizer_state.pt" if len(found) == 1 else None


def step_table(flow: dict[str, Any]) -> list[dict[str, Any]]:
    """Per flow step: seconds (Prefect task run), state, tokens/s, peak GPU memory, model loads.

    Peak memory and model loads come from the step's MLflow child runs (``peak_gpu_bytes``,
    ``peak_gpu_reserved_bytes``, ``peak_rss_bytes``, ``model_loads``) where they carry them, else from
    the trace: a traced step call belongs to the task run of its step whose time window holds its
    start; a traced load belongs to the step call running in the same process at that moment. A
    cache hit (Prefect state ``Cached``, or its child tagged ``cached``) loaded nothing and has no
    peak of its own (its child carries the figures of the run that computed it).
    """
    calls = [r for r in flow["trace"] if r["event"] == "step"]
    loads = [r for r in flow["trace"] if r["event"] != "step"]
    info = flow.get("step_info", {})
    rows = []
    for run in flow["task_runs"]:
        # a calibration run is named after its branches: calibrate_image_text+text, calibrate_text[1]
        labels = run["task"].removeprefix("calibrate_").split("+") if run["task"].startswith("calibrate") else []
        function = "calibrate" if labels else STEP_FUNCTIONS.get(run["task"])
        mine = [c for c in calls if c["name"] == function and run["start"] and run["end"]
                and run["start"] - 1 <= c["start"] <= run["end"]]
        mine_loads = [r for c in mine for r in loads
                      if r["pid"] == c["pid"] and c["start"] <= r["start"] <= c["start"] + c["seconds"]]
        names = [step for step in flow["step_metrics"]
                 if step == run["task"] or step.startswith(run["task"] + "[")
                 or (labels and step.removeprefix("calibrate_") in labels)]
        children = [flow["step_metrics"][name] for name in names]
        cached = run["state"] == "Cached" or any(info.get(name, {}).get("cached") for name in names)
        tokens = sum(m.get("tokens", 0.0) for m in children)
        seconds = sum(m.get("calibrate_seconds", 0.0) for m in children)
        logged = {key: [m[key] for m in children if key in m]
                  for key in ("peak_gpu_bytes", "peak_gpu_reserved_bytes", "peak_rss_bytes", "model_loads", "weight_bytes")}
        traced_peak = max((c.get("peak_gpu_bytes") or 0 for c in mine), default=0) or None
        trace_loads = sum(r["event"] == "load" for r in mine_loads)
        export_reads = sum(r["event"] == "load_export" for r in mine_loads)
        rows.append({
            "step": run["task"], "state": run["state"], "seconds": run["seconds"], "cached": cached,
            "tokens_per_second": tokens / seconds if tokens and seconds and not cached else None,
            "peak_gpu_bytes": None if cached else (max(logged["peak_gpu_bytes"]) if logged["peak_gpu_bytes"]
                                                   else traced_peak) or None,
            "peak_gpu_reserved_bytes": None if cached else max(logged["peak_gpu_reserved_bytes"], default=0.0) or None,
            "peak_rss_bytes": None if cached else max(logged["peak_rss_bytes"], default=0.0) or None,
            "model_loads": 0 if cached else (int(sum(logged["model_loads"])) if logged["model_loads"]
                                             else trace_loads + export_reads),
            "loads_from": "mlflow" if logged["model_loads"] else "trace",
            "trace_loads": trace_loads, "export_reads": export_reads,
            "load_seconds": sum(r["seconds"] for r in mine_loads),
            "weight_bytes": max(logged["weight_bytes"], default=0.0) or None,
            "placement": next((info[name]["placement"] for name in names if info.get(name, {}).get("placement")), None),
        })
    return rows


def flow_model_loads(flow: dict[str, Any]) -> int:
    """Models the flow run read from files: the MLflow parent's ``model_loads``, else the trace's loads."""
    parent = flow.get("parent_metrics", {})
    if "model_loads" in parent:
        return int(parent["model_loads"])
    return sum(r["event"] in ("load", "load_export") for r in flow["trace"])


def model_weight_bytes(layers: int, tiny: bool) -> float:
    """BF16 bytes of the weights the transformers model loads (the checkpoint less its ``mtp.*``)."""
    sizes = checkpoint_bytes(layers, tiny)
    return sizes["total"] - sizes["mtp"]


def peak_checks(flow: dict[str, Any], weight_bytes: float) -> dict[str, Any]:
    """Every step's peak GPU memory against its limit: the run's ``placement.memory_budget_gib`` when
    set (allocated and reserved bytes), else ``TARGETS["peak_vs_weights"]`` x the BF16 weight bytes.

    Cache hits and steps without a GPU peak (CPU runs, steps that hold no model) are listed as
    unchecked. ``weight_bytes`` is the fallback when no step logged the placement's ``weight_bytes``.
    """
    rows = step_table(flow)
    budget = (flow.get("placement") or {}).get("memory_budget_gib")
    weights = max((r["weight_bytes"] or 0.0 for r in rows), default=0.0) or weight_bytes
    limit = budget * GIB if budget else TARGETS["peak_vs_weights"] * weights
    checks = []
    for row in rows:
        peak, reserved = row["peak_gpu_bytes"], row["peak_gpu_reserved_bytes"]
        if not peak:
            checks.append({"step": row["step"], "checked": False, "why": "cache hit" if row["cached"] else "no GPU peak"})
            continue
        worst = max(peak, reserved or 0.0) if budget else peak
        checks.append({"step": row["step"], "checked": True, "peak_gpu_bytes": peak, "peak_gpu_reserved_bytes": reserved,
                       "limit_bytes": limit, "ok": worst <= limit})
    checked = [c for c in checks if c["checked"]]
    return {"budget_gib": budget, "weight_bytes": weights, "limit_bytes": limit,
            "limit": f"budget {budget:g} GiB" if budget else f"{TARGETS['peak_vs_weights']}x BF16 weights "
                                                            f"({weights / 1e9:.2f} GB)",
            "steps": checks, "all_ok": all(c["ok"] for c in checked) if checked else None}


def flow_through_export(flow: dict[str, Any]) -> float | None:
    """Seconds from the flow call to the end of its export step (the work the baseline also does)."""
    ends = [run["end"] for run in flow["task_runs"] if run["task"] == "export" and run["end"]]
    return max(ends) - flow["started_at"] if ends else None


def calibration_span(flow: dict[str, Any]) -> float | None:
    """Seconds from the first calibration task run's start to the last one's end."""
    runs = [r for r in flow["task_runs"] if r["task"].startswith("calibrate") and r["start"] and r["end"]]
    return max(r["end"] for r in runs) - min(r["start"] for r in runs) if runs else None


def calibration_speedup(one_gpu: dict[str, Any], two_gpu: dict[str, Any]) -> dict[str, Any]:
    """The calibration stage on one GPU (one task, one model load) against two GPUs (one call per GPU).

    Besides the stage's span and speedup: each GPU's mean utilisation over each run's stage (from
    ``calibration_gpu_utilisation``, nvidia-smi samples), the preload task runs of the 2-GPU run
    (the worker's load, overlapped with fetch and the reference, outside the stage), and both
    runs' time from the flow call to the end of export (so an overlap that only moves time is seen).
    """
    one, two = calibration_span(one_gpu), calibration_span(two_gpu)
    return {"one_gpu_seconds": one, "two_gpu_seconds": two, "speedup": one / two if one and two else None,
            "target": TARGETS["calibration_2gpu_speedup"],
            "two_gpu_tasks": {r["name"]: r["seconds"] for r in two_gpu["task_runs"] if r["task"].startswith("calibrate")},
            "two_gpu_preloads": {r["name"]: r["seconds"] for r in two_gpu["task_runs"] if r["task"].startswith("preload")},
            "two_gpu_model_loads": sum(r["event"] == "load" for r in two_gpu["trace"]),
            "one_gpu_utilisation": one_gpu.get("calibration_gpu_utilisation", {}),
            "two_gpu_utilisation": two_gpu.get("calibration_gpu_utilisation", {}),
            "one_gpu_through_export_seconds": flow_through_export(one_gpu),
            "two_gpu_through_export_seconds": flow_through_export(two_gpu)}


def calibration_ratios(calibration: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Calibration tokens/s over plain BF16 forward tokens/s, per variant, per branch and both together."""
    ratios: dict[str, dict[str, float]] = {}
    plain_seconds = sum(r["seconds"] for r in calibration["plain"].values())
    for name, kinds in calibration["variants"].items():
        ratios[name] = {kind: r["vs_plain"] for kind, r in kinds.items()}
        ratios[name]["both"] = plain_seconds / sum(r["seconds"] for r in kinds.values())
    return ratios


def checkpoint_bytes(layers: int, tiny: bool) -> dict[str, float]:
    """Parameter bytes (BF16) of the checkpoint with ``layers`` decoder layers, built on the meta device:
    ``total``, ``decoder`` (the decoder layers) and ``mtp`` (the ``mtp.*`` tensors)."""
    specs, _ = _specs(layers, tiny)
    per = {"total": 0.0, "decoder": 0.0, "mtp": 0.0}
    for spec in specs:
        size = 2.0 * math.prod(spec.shape)
        per["total"] += size
        per["decoder"] += size if spec.name.startswith("model.language_model.layers.") else 0.0
        per["mtp"] += size if spec.name.startswith("mtp.") else 0.0
    return per


@functools.lru_cache(maxsize=8)
def _specs(layers: int, tiny: bool) -> tuple[list[Any], Any]:
    from quantdag.demo.dims import Qwen35Dims, qwen3_5_config
    from quantdag.demo.weights import model_specs, mtp_specs

    dims = Qwen35Dims(num_hidden_layers=layers) if tiny else Qwen35Dims.qwen3_6_27b(layers)
    config = qwen3_5_config(dims)
    return model_specs(config) + mtp_specs(config), config


def linear_parameters(layers: int, tiny: bool) -> dict[str, float]:
    """Weights that multiply every token of a calibration forward, by where they run.

    ``language``: the decoder layers' matrices (every linear of attention, linear attention and
    MLP; the conv1d and the norms are not matrices); ``vision``: the vision blocks' matrices and
    the patch embedding (a linear over each patch), per patch; ``merger``: the projector's matrices,
    per merged image token. The embedding lookups, ``lm_head`` (the loops keep one logit or none)
    and ``mtp.*`` (not loaded) are left out; so is attention's own seq x seq work.
    """
    specs, config = _specs(layers, tiny)
    out = {"language": 0.0, "vision": 0.0, "merger": 0.0,
           "spatial_merge_size": float(config.vision_config.spatial_merge_size)}
    for spec in specs:
        if not spec.name.endswith(".weight") or len(spec.shape) < 2:
            continue
        size = float(math.prod(spec.shape))
        if spec.name.startswith("model.language_model.layers.") and len(spec.shape) == 2:
            out["language"] += size
        elif spec.name.startswith(("model.visual.blocks.", "model.visual.patch_embed.")):
            out["vision"] += size
        elif spec.name.startswith("model.visual.merger.") and len(spec.shape) == 2:
            out["merger"] += size
    return out


def calibration_tokens(results: dict[str, Any]) -> dict[str, Any] | None:
    """Tokens through the language model and image tokens of the calibration rows (the baseline's,
    else the cold flow's calibration children)."""
    mono = results.get("monolithic")
    if mono and "tokens" in mono:
        return {"tokens": float(sum(mono["tokens"].values())), "image_tokens": float(mono.get("image_tokens", 0.0)),
                "source": "monolithic"}
    for name in ("flow_cold", "flow_budget"):
        flow = results.get(name)
        if flow:
            children = {k: m for k, m in flow["step_metrics"].items() if k.startswith("calibrate")}
            if children:
                return {"tokens": sum(m.get("tokens", 0.0) for m in children.values()),
                        "image_tokens": sum(m.get("image_tokens", 0.0) for m in children.values()), "source": name}
    return None


def physical_floor(results: dict[str, Any], layers: int, tiny: bool) -> dict[str, Any] | None:
    """The least time a run can take on this machine, from the ``floor`` stage's measured rates:

    - weights read: the base's bytes at the measured read speed (and, on a GPU, at the pinned
      host-to-GPU speed; the slower of the two, as both can overlap);
    - calibration: 2 x (linear weights x tokens) FLOPs (:func:`linear_parameters`) at the measured
      dense matmul rate;
    - export: the exported bytes at the measured disk write speed (fsynced).

    Each run's wall time is then compared with ``TARGETS["run_vs_floor"]`` x the floor; each figure
    comes with its arithmetic.
    """
    measured, tokens = results.get("floor"), calibration_tokens(results)
    if not measured or not tokens:
        return None
    params = linear_parameters(layers, tiny)
    merge = params["spatial_merge_size"] ** 2
    flops = 2.0 * (params["language"] * tokens["tokens"] + params["vision"] * tokens["image_tokens"] * merge
                   + params["merger"] * tokens["image_tokens"])
    rate = measured["matmul"]["flops_per_second"]
    base, read = measured["base_bytes"], measured["read"]["bytes_per_second"]
    h2d = measured.get("h2d", {}).get("bytes_per_second")
    load = max(base / read, base / h2d if h2d else 0.0)
    mono, cold = results.get("monolithic"), results.get("flow_cold")
    export_bytes = (mono or {}).get("export_bytes") or (float(sum(cold["checkpoint"]["files"].values()))
                                                        if cold and cold.get("checkpoint") else 0.0)
    write = measured["write"]["bytes_per_second"]
    parts = {
        "weights_read": {"seconds": load, "arithmetic": (
            f"{base / 1e9:.2f} GB / {read / 1e9:.2f} GB/s read = {base / read:.1f} s"
            + (f"; / {h2d / 1e9:.1f} GB/s host-to-GPU = {base / h2d:.1f} s; the slower: {load:.1f} s" if h2d else ""))},
        "calibration": {"seconds": flops / rate, "flops": flops, "arithmetic": (
            f"2 x ({params['language']:.4g} LM weights x {tokens['tokens']:,.0f} tokens"
            f" + {params['vision']:.4g} vision weights x {tokens['image_tokens'] * merge:,.0f} patches"
            f" + {params['merger']:.4g} merger weights x {tokens['image_tokens']:,.0f} image tokens)"
            f" = {flops:.3e} FLOP / {rate / 1e12:.1f} TFLOP/s = {flops / rate:.2f} s")},
        "export_write": {"seconds": export_bytes / write, "bytes": export_bytes, "arithmetic": (
            f"{export_bytes / 1e9:.2f} GB / {write / 1e9:.2f} GB/s written (fsync) = {export_bytes / write:.1f} s")},
    }
    total = sum(p["seconds"] for p in parts.values())
    out: dict[str, Any] = {"parts": parts, "seconds": total, "tokens": tokens, "linear_parameters": params,
                           "arithmetic": " + ".join(f"{p['seconds']:.1f}" for p in parts.values()) + f" = {total:.1f} s",
                           "runs": {}}
    candidates = {}
    if mono and "process_seconds" in mono:
        candidates["baseline process"] = mono["process_seconds"]
    for name in ("flow_cold", "flow_budget"):
        flow = results.get(name)
        if flow and "process_seconds" in flow:
            through = flow_through_export(flow)
            if through is not None:
                candidates[f"{FLOW_RUNS[name]} process through export"] = (
                    flow["process_seconds"] - (flow["wall_seconds"] - through))
            candidates[f"{FLOW_RUNS[name]} process, end to end"] = flow["process_seconds"]
    for label, seconds in candidates.items():
        out["runs"][label] = {"seconds": seconds, "vs_floor": seconds / total if total else math.nan,
                              "arithmetic": f"{seconds:.1f} s / {total:.1f} s = {seconds / total:.2f}x floor"
                                            if total else "-"}
    return out


def extrapolate(results: dict[str, Any], layers: int, tiny: bool, target_layers: int = 64) -> dict[str, Any]:
    """Estimate baseline, flow and cached-rerun seconds at ``target_layers`` from this run's parts.

    Byte-bound parts (loads, export, store hashing and copies, audit, evaluation) scale with
    checkpoint bytes; calibration compute (the data loops) scales with decoder layers, except the
    vision tower's share of the image-text loop (measured in the calibration stage), which is
    fixed; fetches, imports, the processor's work on the rows, Prefect/MLflow bookkeeping and the
    cached rerun are fixed. The baseline's prepare phase is fixed, as the flow's counterpart is.
    """
    now, then = checkpoint_bytes(layers, tiny), checkpoint_bytes(target_layers, tiny)
    bytes_ratio, layer_ratio = then["total"] / now["total"], target_layers / layers
    calibration = results.get("calibration")
    vision = calibration["vision_seconds"] / calibration["plain"]["image_text"]["seconds"] if calibration else 0.5
    image_share = 0.5
    mono = results.get("monolithic")
    if mono:
        tokens = mono["tokens"]
        image_share = tokens.get("image_text", 0) / max(1, sum(tokens.values()))
    compute_ratio = image_share * (vision + (1 - vision) * layer_ratio) + (1 - image_share) * layer_ratio
    out: dict[str, Any] = {"target_layers": target_layers, "bytes_ratio": bytes_ratio, "layer_ratio": layer_ratio,
                           "calibration_compute_ratio": compute_ratio, "vision_share_of_image_loop": vision,
                           "assumptions": extrapolate.__doc__.split("\n\n")[1].split()}
    out["assumptions"] = " ".join(out["assumptions"])
    if mono:
        p = mono["phases"]
        out["monolithic_seconds"] = (p["prepare"]["seconds"] + p["load"]["seconds"] * bytes_ratio
                                     + p["calibrate"]["seconds"] * compute_ratio + p["export"]["seconds"] * bytes_ratio)
    flow = results.get("flow_cold")
    if flow:
        steps = {row["step"]: row for row in step_table(flow)}
        calibrate = sum(r["seconds"] for s, r in steps.items() if s.startswith("calibrate"))
        calibrate_loads = sum(r["load_seconds"] for s, r in steps.items() if s.startswith("calibrate"))
        # the data loops (each branch's own calibrate_seconds) grow with layers; the rest of the
        # step (imports, processor work on the rows, state files) is fixed
        compute = sum(m.get("calibrate_seconds", 0.0) for name, m in flow["step_metrics"].items()
                      if name.startswith("calibrate")) or max(0.0, calibrate - calibrate_loads)
        export = steps.get("export", {}).get("seconds", 0.0)
        merge = steps.get("merge_amax", {}).get("seconds", 0.0)
        through = flow_through_export(flow) or flow["wall_seconds"]
        fixed = max(0.0, through - calibrate - export - merge)
        calibrate_fixed = max(0.0, calibrate - calibrate_loads - compute)
        calibrate_64 = calibrate_loads * bytes_ratio + compute * compute_ratio + calibrate_fixed
        tail = max(steps.get("audit", {}).get("seconds", 0.0), steps.get("evaluate", {}).get("seconds", 0.0))
        rest = max(0.0, flow["wall_seconds"] - through - tail)
        out["flow_through_export_seconds"] = fixed + calibrate_64 + merge + export * bytes_ratio
        out["flow_seconds"] = out["flow_through_export_seconds"] + tail * bytes_ratio + rest
    cached = results.get("flow_cached")
    if cached:
        out["flow_cached_seconds"] = cached["wall_seconds"]
    if mono and flow:
        base = out["monolithic_seconds"]
        out["flow_through_export_vs_baseline"] = out["flow_through_export_seconds"] / base
        out["flow_vs_baseline"] = out["flow_seconds"] / base
        if "flow_cached_seconds" in out:
            out["cached_vs_baseline"] = out["flow_cached_seconds"] / base
        if "process_seconds" in mono and "process_seconds" in flow:
            # interpreter start and imports: fixed, paid by the script and by the flow's process alike
            base_process = base + mono["process_seconds"] - mono["work_seconds"]
            flow_fixed = flow["process_seconds"] - flow["wall_seconds"]
            out["flow_process_through_export_vs_baseline_process"] = (
                (out["flow_through_export_seconds"] + flow_fixed) / base_process)
            if cached and "process_seconds" in cached:
                out["cached_process_vs_baseline_process"] = cached["process_seconds"] / base_process
    return out


def _compare_amax(merged: Path | None, reference: Path | None, what: str) -> dict[str, Any]:
    import torch

    from quantdag.calibration.quantizer_state import load_state

    if merged is None or reference is None or not reference.is_file():
        return {"compared": False, "why": f"{what}: states {merged}, {reference}"}
    flow, mono = load_state(merged)["amax"], load_state(reference)["amax"]
    differ = sorted(n for n in mono if n not in flow or not torch.equal(flow[n], mono[n]))
    worst = max((float(((flow[n] - mono[n]).abs() / mono[n].abs().clamp_min(1e-30)).max()) for n in differ if n in flow),
                default=0.0)
    return {"compared": True, "quantizers": len(mono), "equal": len(mono) - len(differ), "differing": differ[:10],
            "max_relative_difference": worst}


def amax_agreement(workdir: Path) -> dict[str, Any]:
    """The flow's merged amax against the baseline's, bit for bit."""
    from quantdag.calibration.quantizer_state import STATE_FILE

    return _compare_amax(merged_state(workdir), workdir / "monolithic" / "state" / STATE_FILE, "flow vs baseline")


def budget_amax_agreement(workdir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The budgeted run's merged amax against the unbudgeted cold run's, when both calibrated the same rows."""
    rows = [results.get(name, {}).get("calibration_rows") for name in ("flow_cold", "flow_budget")]
    if rows[0] != rows[1]:
        return {"compared": False, "why": f"different calibration rows (cold {rows[0]}, budget {rows[1]})"}
    return _compare_amax(merged_state(workdir, "artifacts-budget"), merged_state(workdir), "budget vs cold")


def _flow_run_summary(flow: dict[str, Any], weight_bytes: float) -> dict[str, Any]:
    through = flow_through_export(flow)
    out = {"steps": step_table(flow), "wall_seconds": flow["wall_seconds"], "through_export_seconds": through,
           "process_seconds": flow.get("process_seconds"), "model_loads": flow_model_loads(flow),
           "model_loads_from": "mlflow parent" if "model_loads" in flow.get("parent_metrics", {}) else "trace",
           "placement": flow.get("placement"), "peaks": peak_checks(flow, weight_bytes),
           "all_cached": all(flow["cached"].values()) if flow.get("cached") else None}
    if flow.get("process_seconds") is not None and through is not None:
        out["process_through_export_seconds"] = flow["process_seconds"] - (flow["wall_seconds"] - through)
    return out


_NOT_HERE = {"compared": False, "why": "the workdir's states are not on this machine"}


def summarize(results: dict[str, Any], workdir: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report prints, from the merged stage results (``workdir``: None or missing
    reuses the amax comparisons of an earlier summary in ``results``)."""
    summary: dict[str, Any] = {"targets": TARGETS}
    earlier = results.get("summary", {})
    have_files = workdir is not None and Path(workdir).is_dir()
    mono, cold, cached = results.get("monolithic"), results.get("flow_cold"), results.get("flow_cached")
    weights = model_weight_bytes(args.layers, args.tiny)
    summary["bf16_weight_bytes"] = weights
    if results.get("calibration"):
        summary["calibration_vs_plain"] = calibration_ratios(results["calibration"])
    if mono:
        summary["baseline_seconds"] = mono["work_seconds"]
        summary["baseline_model_loads"] = mono["model_loads"]
    summary["runs"] = {name: _flow_run_summary(results[name], weights) for name in FLOW_RUNS if results.get(name)}
    if cold:
        summary["flow_steps"] = summary["runs"]["flow_cold"]["steps"]
        summary["flow_model_loads"] = sum(r["event"] == "load" for r in cold["trace"])
        summary["flow_export_reads"] = sum(r["event"] == "load_export" for r in cold["trace"])
        summary["flow_load_seconds"] = sum(r["seconds"] for r in cold["trace"] if r["event"] != "step")
        summary["flow_seconds"] = cold["wall_seconds"]
        summary["flow_through_export_seconds"] = flow_through_export(cold)
        summary["versions"] = cold["mlflow_tags"]
    if cached:
        summary["flow_cached_seconds"] = cached["wall_seconds"]
        summary["flow_cached_all_hits"] = all(cached["cached"].values())
    if mono and cold:
        base = mono["work_seconds"]
        summary["flow_vs_baseline"] = cold["wall_seconds"] / base
        summary["flow_through_export_vs_baseline"] = (summary["flow_through_export_seconds"] or math.nan) / base
        summary["flow_process_vs_baseline_process"] = cold["process_seconds"] / mono["process_seconds"]
        after_export = cold["wall_seconds"] - (summary["flow_through_export_seconds"] or cold["wall_seconds"])
        summary["flow_process_through_export_vs_baseline_process"] = (
            (cold["process_seconds"] - after_export) / mono["process_seconds"])
        summary["amax_flow_vs_baseline"] = (amax_agreement(Path(workdir)) if have_files
                                            else earlier.get("amax_flow_vs_baseline", _NOT_HERE))
    if cold and results.get("flow_budget"):
        summary["amax_budget_vs_cold"] = (budget_amax_agreement(Path(workdir), results) if have_files
                                          else earlier.get("amax_budget_vs_cold", _NOT_HERE))
    if mono and cached:
        summary["cached_vs_baseline"] = cached["wall_seconds"] / mono["work_seconds"]
        summary["cached_process_vs_baseline_process"] = cached["process_seconds"] / mono["process_seconds"]
    if cold and results.get("flow_2gpu"):
        summary["calibration_2gpu"] = calibration_speedup(cold, results["flow_2gpu"])
    if (mono or cold) and args.layers < 64:
        summary["extrapolated"] = extrapolate(results, args.layers, args.tiny)
    floor = physical_floor(results, args.layers, args.tiny)
    if floor:
        summary["floor"] = floor
    return summary


def _gb(value: float | None) -> str:
    return f"{value / 1e9:.1f} GB" if value else "-"


def _step_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| step | s | tokens/s | peak GPU | reserved | peak RSS | loads | placement |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loads = "cached" if r["cached"] else f"{r['model_loads']}" + ("" if r["loads_from"] == "mlflow" else " (trace)")
        rate = f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else "-"
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {rate} | {_gb(r['peak_gpu_bytes'])} "
                     f"| {_gb(r['peak_gpu_reserved_bytes'])} | {_gb(r['peak_rss_bytes'])} | {loads} | {r['placement'] or '-'} |")
    return lines


def report(summary: dict[str, Any], results: dict[str, Any]) -> str:
    """The tables printed at the end of a run."""
    lines = []
    if results.get("monolithic"):
        mono = results["monolithic"]
        lines += [f"baseline (one process): work {mono['work_seconds']:.1f} s, process {mono.get('process_seconds', 0):.1f} s, "
                  f"model loads {mono['model_loads']}", "| phase | s | peak GPU | loads |", "|---|---|---|---|"]
        lines += [f"| {name} | {p['seconds']:.1f} | {_gb(p['peak_gpu_bytes'])} | {mono['model_loads'] if name == 'load' else 0} |"
                  for name, p in mono["phases"].items()]
        lines.append("")
    for name, run in summary.get("runs", {}).items():
        process = f", process {run['process_seconds']:.1f} s" if run.get("process_seconds") is not None else ""
        through = f", through export {run['through_export_seconds']:.1f} s" if run.get("through_export_seconds") else ""
        budget = (run.get("placement") or {}).get("memory_budget_gib")
        lines += [f"{FLOW_RUNS[name]}: wall {run['wall_seconds']:.1f} s{through}{process}, model loads "
                  f"{run['model_loads']} ({run['model_loads_from']})" + (f", budget {budget:g} GiB" if budget else "")]
        lines += _step_lines(run["steps"]) + [""]
    if results.get("calibration"):
        cal = results["calibration"]
        lines += ["calibration vs plain BF16 forward (tokens/s):", "| loop | plain | modelopt | weights once | fast |",
                  "|---|---|---|---|---|"]
        for kind, plain in cal["plain"].items():
            cells = [f"{cal['variants'][v][kind]['tokens_per_second']:,.0f} ({cal['variants'][v][kind]['vs_plain']:.2f}x"
                     f"{'' if cal['variants'][v][kind]['amax_equal_to_modelopt'] else ', AMAX DIFFER'})"
                     for v in ("modelopt", "weights_once", "fast")]
            lines.append(f"| {kind} | {plain['tokens_per_second']:,.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| ratio | value | target |", "|---|---|---|"]
    for key, target, sign in (("flow_vs_baseline", "flow_vs_baseline", "<="),
                              ("flow_through_export_vs_baseline", "flow_vs_baseline", "<="),
                              ("flow_process_vs_baseline_process", "flow_vs_baseline", "<="),
                              ("flow_process_through_export_vs_baseline_process", "flow_vs_baseline", "<="),
                              ("cached_vs_baseline", "cached_vs_baseline", "<="),
                              ("cached_process_vs_baseline_process", "cached_vs_baseline", "<=")):
        if key in summary:
            lines.append(f"| {key} | {summary[key]:.3f} | {sign} {TARGETS[target]} |")
    if "calibration_vs_plain" in summary:
        for variant, ratios in summary["calibration_vs_plain"].items():
            lines.append(f"| calibration ({variant}) vs plain, both loops | {ratios['both']:.3f} | >= {TARGETS['calibration_vs_plain']} |")
    steady = results.get("calibration", {}).get("steady_state", {})
    for variant, kinds in steady.items():
        cells = ", ".join(f"{kind} {r['vs_plain']:.3f} (fixed {r['fixed_seconds']:.2f} s)" for kind, r in kinds.items()
                          if r.get("vs_plain"))
        lines.append(f"| calibration ({variant}) vs plain, steady state per pass | {cells} | >= {TARGETS['calibration_vs_plain']} |")
    for name, run in summary.get("runs", {}).items():
        peaks = run["peaks"]
        for check in peaks["steps"]:
            if check["checked"]:
                reserved = (f" (reserved {_gb(check['peak_gpu_reserved_bytes'])})"
                            if peaks["budget_gib"] and check["peak_gpu_reserved_bytes"] else "")
                lines.append(f"| {FLOW_RUNS[name]} {check['step']}: peak GPU {_gb(check['peak_gpu_bytes'])}{reserved} "
                             f"| {check['peak_gpu_bytes'] / check['limit_bytes']:.3f} of limit, "
                             f"{'ok' if check['ok'] else 'OVER'} | <= {peaks['limit']} |")
    if "calibration_2gpu" in summary:
        two = summary["calibration_2gpu"]
        lines.append(f"| calibration stage, 2 GPUs vs 1 GPU (speedup) | {two['speedup'] or math.nan:.2f} "
                     f"({two['one_gpu_seconds'] or 0:.1f} s -> {two['two_gpu_seconds'] or 0:.1f} s) "
                     f"| >= {two.get('target', TARGETS['calibration_2gpu_speedup'])} |")
        for run in ("one_gpu", "two_gpu"):
            per_gpu = two.get(f"{run}_utilisation") or {}
            cells = ", ".join(f"GPU {gpu} {u['mean_util_pct']:.0f}% (busy {u['busy_fraction']:.0%}, "
                              f"peak {u['peak_mem_mib'] / 1024:.1f} GiB)" for gpu, u in per_gpu.items())
            lines.append(f"| calibration stage, {run.replace('_', ' ').replace('gpu', 'GPU')} run: utilisation per GPU "
                         f"| {cells or 'no samples'} | |")
        if two.get("one_gpu_through_export_seconds") and two.get("two_gpu_through_export_seconds"):
            lines.append(f"| flow call to end of export, 1 GPU -> 2 GPUs | {two['one_gpu_through_export_seconds']:.1f} s "
                         f"-> {two['two_gpu_through_export_seconds']:.1f} s (preloads: "
                         f"{', '.join(f'{s:.1f} s' for s in two.get('two_gpu_preloads', {}).values()) or 'none'}) | |")
    extra = summary.get("extrapolated", {})
    for key in ("flow_vs_baseline", "flow_through_export_vs_baseline", "cached_vs_baseline",
                "flow_process_through_export_vs_baseline_process", "cached_process_vs_baseline_process"):
        if key in extra:
            lines.append(f"| {key} at {extra['target_layers']} layers (estimate) | {extra[key]:.3f} | |")
    floor = summary.get("floor")
    if floor:
        measured = results["floor"]
        lines += ["", f"physical floor ({measured.get('gpu_name', measured['device'])}; rates measured in this run): "
                      f"{floor['seconds']:.1f} s"]
        lines += [f"- {name.replace('_', ' ')}: {part['arithmetic']}" for name, part in floor["parts"].items()]
        lines.append(f"- floor = {floor['arithmetic']}")
        for label, run in floor["runs"].items():
            verdict = "ok" if run["vs_floor"] <= TARGETS["run_vs_floor"] else "over"
            lines.append(f"- {label}: {run['arithmetic']} (target <= {TARGETS['run_vs_floor']}x: {verdict})")
    if "flow_model_loads" in summary:
        lines.append(f"\nmodel loads (trace): flow {summary['flow_model_loads']} + {summary['flow_export_reads']} export reads "
                     f"({summary['flow_load_seconds']:.1f} s), baseline {summary.get('baseline_model_loads', '-')} "
                     f"({results.get('monolithic', {}).get('phases', {}).get('load', {}).get('seconds', 0):.1f} s)")
    for name, run in summary.get("runs", {}).items():
        lines.append(f"model loads, {FLOW_RUNS[name]} ({run['model_loads_from']}): {run['model_loads']}")
    if results.get("agreement"):
        agree = results["agreement"]
        lines.append(f"file vs in-memory fake quant (float32, unified amax): ||a-b||/||b|| = "
                     f"{agree['rel_file_vs_fakequant']:.2e} (target < 1e-3), top-1 {agree['top1_agreement']:.4f}")
    for key, label in (("amax_flow_vs_baseline", "flow vs baseline"), ("amax_budget_vs_cold", "budget vs cold flow")):
        agree = summary.get(key)
        if agree:
            lines.append(f"merged amax, {label}: " + (f"{agree.get('equal')} of {agree.get('quantizers')} bit-identical"
                                                      if agree.get("compared") else f"not compared ({agree.get('why')})"))
    copies = results.get("base_copies")
    if copies is not None:
        lines.append("copies of the base's safetensors under the workdir: " + (", ".join(copies) if copies else "none"))
    offloaded = results.get("offload_dirs")
    if offloaded:
        full = {path: size for path, size in offloaded.items() if size}
        lines.append(f"offload folders left in the temporary directory: {len(offloaded)}, "
                     + (", ".join(f"{path} {_gb(size)}" for path, size in full.items()) if full else "all empty"))
    return "\n".join(lines)
