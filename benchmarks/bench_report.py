"""Summary of ``benchmarks.gpu_flow_vs_monolithic``: per-step table, ratios, 64-layer estimate.

Pure functions over the stages' JSON results (no model, no GPU), so they are tested on synthetic
results (``tests/benchmarks/test_bench_report.py``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

TARGETS = {"flow_vs_baseline": 1.05, "cached_vs_baseline": 0.02, "calibration_vs_plain": 0.9}
STEP_FUNCTIONS = {"export": "export_checkpoint", "evaluate": "evaluate",
                  "audit": "audit_checkpoint", "merge_amax": "merge_amax", "fetch_text": "fetch_text",
                  "fetch_image_text": "fetch_image_text"}


def merged_state(workdir: Path) -> Path | None:
    """The flow's merged quantizer state (the state artifact that carries ``amax_table.json``)."""
    found = sorted((workdir / "artifacts" / "objects" / "quantizer-state").glob("*/amax_table.json"))
    return found[0].parent / "quantizer_state.pt" if len(found) == 1 else None


def step_table(flow: dict[str, Any]) -> list[dict[str, Any]]:
    """Per flow step: seconds (Prefect task run), state, tokens/s, peak GPU memory, model loads.

    A traced step call belongs to the task run of its step whose time window holds its start; a
    traced load belongs to the step call running in the same process at that moment.
    """
    calls = [r for r in flow["trace"] if r["event"] == "step"]
    loads = [r for r in flow["trace"] if r["event"] != "step"]
    rows = []
    for run in flow["task_runs"]:
        # a calibration run is named after its branches: calibrate_image_text+text, calibrate_text[1]
        labels = run["task"].removeprefix("calibrate_").split("+") if run["task"].startswith("calibrate") else []
        function = "calibrate" if labels else STEP_FUNCTIONS.get(run["task"])
        mine = [c for c in calls if c["name"] == function and run["start"] and run["end"]
                and run["start"] - 1 <= c["start"] <= run["end"]]
        mine_loads = [r for c in mine for r in loads
                      if r["pid"] == c["pid"] and c["start"] <= r["start"] <= c["start"] + c["seconds"]]
        children = [m for step, m in flow["step_metrics"].items()
                    if step == run["task"] or step.startswith(run["task"] + "[")
                    or (labels and step.removeprefix("calibrate_") in labels)]
        tokens = sum(m.get("tokens", 0.0) for m in children)
        seconds = sum(m.get("calibrate_seconds", 0.0) for m in children)
        rows.append({
            "step": run["task"], "state": run["state"], "seconds": run["seconds"],
            "tokens_per_second": tokens / seconds if tokens and seconds else None,
            "peak_gpu_bytes": max((c.get("peak_gpu_bytes") or 0 for c in mine), default=0) or None,
            "model_loads": sum(r["event"] == "load" for r in mine_loads),
            "export_reads": sum(r["event"] == "load_export" for r in mine_loads),
            "load_seconds": sum(r["seconds"] for r in mine_loads),
        })
    return rows


def flow_through_export(flow: dict[str, Any]) -> float | None:
    """Seconds from the flow call to the end of its export step (the work the baseline also does)."""
    ends = [run["end"] for run in flow["task_runs"] if run["task"] == "export" and run["end"]]
    return max(ends) - flow["started_at"] if ends else None


def calibration_span(flow: dict[str, Any]) -> float | None:
    """Seconds from the first calibration task run's start to the last one's end."""
    runs = [r for r in flow["task_runs"] if r["task"].startswith("calibrate") and r["start"] and r["end"]]
    return max(r["end"] for r in runs) - min(r["start"] for r in runs) if runs else None


def calibration_speedup(one_gpu: dict[str, Any], two_gpu: dict[str, Any]) -> dict[str, Any]:
    """The calibration stage on one GPU (one task, one model load) against two GPUs (one task each)."""
    one, two = calibration_span(one_gpu), calibration_span(two_gpu)
    return {"one_gpu_seconds": one, "two_gpu_seconds": two, "speedup": one / two if one and two else None,
            "two_gpu_tasks": {r["name"]: r["seconds"] for r in two_gpu["task_runs"] if r["task"].startswith("calibrate")},
            "two_gpu_model_loads": sum(r["event"] == "load" for r in two_gpu["trace"])}


def calibration_ratios(calibration: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Calibration tokens/s over plain BF16 forward tokens/s, per variant, per branch and both together."""
    ratios: dict[str, dict[str, float]] = {}
    plain_seconds = sum(r["seconds"] for r in calibration["plain"].values())
    for name, kinds in calibration["variants"].items():
        ratios[name] = {kind: r["vs_plain"] for kind, r in kinds.items()}
        ratios[name]["both"] = plain_seconds / sum(r["seconds"] for r in kinds.values())
    return ratios


def checkpoint_bytes(layers: int, tiny: bool) -> dict[str, float]:
    """Parameter bytes (BF16) of the checkpoint with ``layers`` decoder layers, built on the meta device."""
    from quantdag.demo.dims import Qwen35Dims, qwen3_5_config
    from quantdag.demo.weights import model_specs, mtp_specs

    dims = Qwen35Dims(num_hidden_layers=layers) if tiny else Qwen35Dims.qwen3_6_27b(layers)
    config = qwen3_5_config(dims)
    specs = model_specs(config) + mtp_specs(config)
    per = {"total": 0.0, "decoder": 0.0}
    for spec in specs:
        size = 2.0 * math.prod(spec.shape)
        per["total"] += size
        per["decoder"] += size if spec.name.startswith("model.language_model.layers.") else 0.0
    return per


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


def amax_agreement(workdir: Path) -> dict[str, Any]:
    """The flow's merged amax against the baseline's, bit for bit."""
    import torch

    from quantdag.calibration.quantizer_state import STATE_FILE, load_state

    merged, baseline = merged_state(workdir), workdir / "monolithic" / "state" / STATE_FILE
    if merged is None or not baseline.is_file():
        return {"compared": False, "why": f"merged state {merged}, baseline state present: {baseline.is_file()}"}
    flow, mono = load_state(merged)["amax"], load_state(baseline)["amax"]
    differ = sorted(n for n in mono if n not in flow or not torch.equal(flow[n], mono[n]))
    worst = max((float(((flow[n] - mono[n]).abs() / mono[n].abs().clamp_min(1e-30)).max()) for n in differ if n in flow),
                default=0.0)
    return {"compared": True, "quantizers": len(mono), "equal": len(mono) - len(differ), "differing": differ[:10],
            "max_relative_difference": worst}


def summarize(results: dict[str, Any], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {"targets": TARGETS}
    mono, cold, cached = results.get("monolithic"), results.get("flow_cold"), results.get("flow_cached")
    if results.get("calibration"):
        summary["calibration_vs_plain"] = calibration_ratios(results["calibration"])
    if mono:
        summary["baseline_seconds"] = mono["work_seconds"]
        summary["baseline_model_loads"] = mono["model_loads"]
    if cold:
        summary["flow_steps"] = step_table(cold)
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
        summary["amax_flow_vs_baseline"] = amax_agreement(workdir)
    if mono and cached:
        summary["cached_vs_baseline"] = cached["wall_seconds"] / mono["work_seconds"]
        summary["cached_process_vs_baseline_process"] = cached["process_seconds"] / mono["process_seconds"]
    if cold and results.get("flow_2gpu"):
        summary["calibration_2gpu"] = calibration_speedup(cold, results["flow_2gpu"])
    if mono or cold:
        summary["extrapolated"] = extrapolate(results, args.layers, args.tiny)
    return summary


def _gb(value: float | None) -> str:
    return f"{value / 1e9:.1f} GB" if value else "-"


def report(summary: dict[str, Any], results: dict[str, Any]) -> str:
    """The tables printed at the end of a run."""
    lines = []
    if "flow_steps" in summary:
        lines += ["flow (cold), per step:", "| step | s | tokens/s | peak GPU | loads |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['seconds']:.1f} | {r['tokens_per_second'] or 0:,.0f} | {_gb(r['peak_gpu_bytes'])} "
                  f"| {r['model_loads']}+{r['export_reads']} |" for r in summary["flow_steps"]]
    if results.get("monolithic"):
        lines += ["", "baseline (one process):", "| phase | s | peak GPU |", "|---|---|---|"]
        lines += [f"| {name} | {p['seconds']:.1f} | {_gb(p['peak_gpu_bytes'])} |"
                  for name, p in results["monolithic"]["phases"].items()]
    if results.get("calibration"):
        cal = results["calibration"]
        lines += ["", "calibration vs plain BF16 forward (tokens/s):", "| loop | plain | modelopt | weights once | fast |",
                  "|---|---|---|---|---|"]
        for kind, plain in cal["plain"].items():
            cells = [f"{cal['variants'][v][kind]['tokens_per_second']:,.0f} ({cal['variants'][v][kind]['vs_plain']:.2f}x"
                     f"{'' if cal['variants'][v][kind]['amax_equal_to_modelopt'] else ', AMAX DIFFER'})"
                     for v in ("modelopt", "weights_once", "fast")]
            lines.append(f"| {kind} | {plain['tokens_per_second']:,.0f} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
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
    if "calibration_2gpu" in summary:
        two = summary["calibration_2gpu"]
        lines.append(f"| calibration stage, 2 GPUs vs 1 GPU (speedup) | {two['speedup'] or math.nan:.2f} "
                     f"({two['one_gpu_seconds'] or 0:.1f} s -> {two['two_gpu_seconds'] or 0:.1f} s) | |")
    extra = summary.get("extrapolated", {})
    for key in ("flow_vs_baseline", "flow_through_export_vs_baseline", "cached_vs_baseline",
                "flow_process_through_export_vs_baseline_process", "cached_process_vs_baseline_process"):
        if key in extra:
            lines.append(f"| {key} at {extra['target_layers']} layers (estimate) | {extra[key]:.3f} | |")
    if "flow_model_loads" in summary:
        lines.append(f"\nmodel loads: flow {summary['flow_model_loads']} + {summary['flow_export_reads']} export reads "
                     f"({summary['flow_load_seconds']:.1f} s), baseline {summary.get('baseline_model_loads', '-')} "
                     f"({results.get('monolithic', {}).get('phases', {}).get('load', {}).get('seconds', 0):.1f} s), "
                     "cached rerun 0")
    if results.get("agreement"):
        agree = results["agreement"]
        lines.append(f"file vs in-memory fake quant (float32, unified amax): ||a-b||/||b|| = "
                     f"{agree['rel_file_vs_fakequant']:.2e} (target < 1e-3), top-1 {agree['top1_agreement']:.4f}")
    if "amax_flow_vs_baseline" in summary:
        agree = summary["amax_flow_vs_baseline"]
        lines.append(f"\nmerged amax, flow vs baseline: {agree.get('equal')} of {agree.get('quantizers')} bit-identical")
    return "\n".join(lines)
