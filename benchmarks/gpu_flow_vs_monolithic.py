"""The quantize flow against a one-process ModelOpt script, on one GPU, same checkpoint and rows.

    python -m benchmarks.gpu_flow_vs_monolithic --workdir /tmp/bench --out results.json --layers 4

Builds (once) a synthetic checkpoint at Qwen3.6-27B widths with ``--layers`` decoder layers
(``benchmarks.build_model``) and generated calibration data in the real datasets' layouts
(``quantdag.demo.corpus``: ``--image-text-rows`` image-text rows, ``--text-rows`` text rows cut
to ``--seq-len`` tokens), starts a Prefect server (SQLite) and uses MLflow on SQLite with
artifacts on local disk, then runs, each in a process of its own (``benchmarks.bench_stages``):

1. ``calibration``: plain BF16 forward speed of both calibration loops vs max calibration
   (ModelOpt as is / weight quantizers off in the loop / ``tasks.calibrate_shared`` fast path);
2. ``monolithic``: the baseline, load + ``mtq.quantize`` (image-text and text loops) + export;
3. ``flow`` cold: ``flows.quantize.quantize`` on a fresh artifact store and result cache;
4. ``flow`` cached: the same call again (every step a cache hit).

Prints per step seconds, tokens/s and peak GPU memory, the ratios against the targets (flow
<= 1.05x baseline cold, cached rerun <= 0.02x, calibration >= 0.9x plain forward), the model
loads of each run, an extrapolation to 64 layers, and whether the flow's merged amax equal the
baseline's bit for bit; writes everything as JSON to ``--out``. ``--tiny`` runs the demo's tiny
model instead (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"flow_vs_baseline": 1.05, "cached_vs_baseline": 0.02, "calibration_vs_plain": 0.9}
STAGE_ORDER = ("calibration", "monolithic", "flow_cold", "flow_cached", "flow_cached_threads", "agreement")
STEP_FUNCTIONS = {"calibrate_branches": "calibrate_branches", "calibrate_image_text": "calibrate",
                  "calibrate_text": "calibrate", "export": "export_checkpoint", "evaluate": "evaluate",
                  "audit": "audit_checkpoint", "merge_amax": "merge_amax", "fetch_text": "fetch_text",
                  "fetch_image_text": "fetch_image_text"}


# ----------------------------------------------------------------------------------- inputs
def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Checkpoint and corpora under ``workdir`` (reused when complete)."""
    from benchmarks.build_model import build_model
    from quantdag.demo.corpus import IMAGE_TEXT_SUBSETS, write_eval_text, write_image_text_mirror, write_text_mirror

    paths = {"model": workdir / "model", "mirror": workdir / "nemotron-vlm-mirror",
             "text": workdir / "cnn_dailymail" / "train.jsonl", "eval": workdir / "heldout.txt"}
    marker = workdir / f".inputs-{'tiny' if args.tiny else 'qwen36'}-{args.layers}-{args.image_text_rows}-{args.text_rows}"
    if not marker.is_file():
        build_model(paths["model"], args.layers, tiny=args.tiny)
        per_subset = math.ceil(args.image_text_rows / len(IMAGE_TEXT_SUBSETS))
        write_image_text_mirror(paths["mirror"], rows_per_subset=per_subset, seed=0)
        write_text_mirror(paths["text"], n=args.text_rows, seed=0)
        write_eval_text(paths["eval"], n_paragraphs=60, seed=0)
        marker.write_text("ok\n")
    return paths


def make_profile(workdir: Path, paths: dict[str, Path], args: argparse.Namespace) -> Any:
    from conf.schema import EvalSpec, ImageTextSource, Profile, TextSource

    return Profile(
        name="gpu-bench",
        base={"local_dir": str(paths["model"])},
        image_text=ImageTextSource(path=str(paths["mirror"]), num_samples=args.image_text_rows,
                                   **({"max_image_pixels": 128 * 128, "max_text_tokens": 64} if args.tiny else {})),
        text=TextSource(path=str(paths["text"]), num_samples=args.text_rows, seq_len=args.seq_len),
        eval=EvalSpec(path=str(paths["eval"]), seq_len=args.seq_len, max_windows=args.eval_windows),
        artifact_store=str(workdir / "artifacts"),
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        device=args.device,
    )


# ---------------------------------------------------------------------------------- servers
class PrefectServer:
    """``prefect server start`` on SQLite in its own process group (stopped by killing the group)."""

    def __init__(self, home: Path, log: Path, env: dict[str, str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": self.url}
        start = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.perf_counter() - start > 120:
                    self.stop()
                    raise RuntimeError(f"prefect server not ready after 120 s: {log.read_text()[-2000:]}") from None
                time.sleep(0.25)
        self.start_seconds = time.perf_counter() - start

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def merged_state(workdir: Path) -> Path | None:
    """The flow's merged quantizer state (the state artifact that carries ``amax_table.json``)."""
    found = sorted((workdir / "artifacts" / "objects" / "quantizer-state").glob("*/amax_table.json"))
    return found[0].parent / "quantizer_state.pt" if len(found) == 1 else None


def stage_command(stage: str, spec_path: Path, out: Path, spec: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The command line of one stage (the agreement stage compares the cold flow's export and state)."""
    if stage == "agreement":
        workdir, profile = Path(spec["monolithic_dir"]).parent, spec["profile"]
        if "flow_cold" not in results or merged_state(workdir) is None:
            raise RuntimeError("the agreement stage needs the cold flow's export and merged state: run flow_cold first")
        return [sys.executable, "-m", "benchmarks.file_vs_fakequant", "--base", profile["base"]["local_dir"],
                "--export", results["flow_cold"]["checkpoint"]["uri"], "--state", str(merged_state(workdir)),
                "--text", profile["eval"]["path"], "--tokens", str(profile["text"].get("seq_len", 512)),
                "--rows", "2", "--device", spec["device"], "--label", "flow-export", "--json", str(out)]
    command = {"flow_cold": "flow", "flow_cached": "flow", "flow_cached_threads": "flow_threads"}.get(stage, stage)
    return [sys.executable, "-m", "benchmarks.bench_stages", command, "--spec", str(spec_path), "--out", str(out)]


def run_stage(stage: str, spec_path: Path, workdir: Path, env: dict[str, str], results: dict[str, Any]) -> dict[str, Any]:
    """One stage in a fresh interpreter; its JSON result plus the process's own wall time."""
    out, log = workdir / f"{stage}.json", workdir / "logs" / f"{stage}.log"
    command = stage_command(stage, spec_path, out, json.loads(spec_path.read_text()), results)
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"stage {stage} failed ({done.returncode}); last lines of {log}:\n{log.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------- summary
def step_table(flow: dict[str, Any]) -> list[dict[str, Any]]:
    """Per flow step: seconds (Prefect task run), state, tokens/s, peak GPU memory, model loads.

    A traced step call belongs to the task run of its step whose time window holds its start; a
    traced load belongs to the step call running in the same process at that moment.
    """
    calls = [r for r in flow["trace"] if r["event"] == "step"]
    loads = [r for r in flow["trace"] if r["event"] != "step"]
    rows = []
    for run in flow["task_runs"]:
        function = STEP_FUNCTIONS.get(run["task"])
        mine = [c for c in calls if c["name"] == function and run["start"] and run["end"]
                and run["start"] - 1 <= c["start"] <= run["end"]]
        mine_loads = [r for c in mine for r in loads
                      if r["pid"] == c["pid"] and c["start"] <= r["start"] <= c["start"] + c["seconds"]]
        children = [m for step, m in flow["step_metrics"].items()
                    if step == run["task"] or step.startswith(run["task"] + "[")
                    or (run["task"] == "calibrate_branches" and step.startswith("calibrate_"))]
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
    from quantdag.demo.tiny_model import Qwen35Dims, qwen3_5_config
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
    checkpoint bytes; calibration compute scales with decoder layers, except the vision tower's
    share of the image-text loop (measured in the calibration stage), which is fixed; fetches,
    Prefect/MLflow bookkeeping and the cached rerun are fixed.
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
        export = steps.get("export", {}).get("seconds", 0.0)
        merge = steps.get("merge_amax", {}).get("seconds", 0.0)
        through = flow_through_export(flow) or flow["wall_seconds"]
        fixed = max(0.0, through - calibrate - export - merge)
        calibrate_64 = calibrate_loads * bytes_ratio + (calibrate - calibrate_loads) * compute_ratio
        tail = max(steps.get("audit", {}).get("seconds", 0.0), steps.get("evaluate", {}).get("seconds", 0.0))
        rest = max(0.0, flow["wall_seconds"] - through - tail)
        out["flow_through_export_seconds"] = fixed + calibrate_64 + merge + export * bytes_ratio
        out["flow_seconds"] = out["flow_through_export_seconds"] + tail * bytes_ratio + rest
    if results.get("flow_cached"):
        out["flow_cached_seconds"] = results["flow_cached"]["wall_seconds"]
    if mono and flow:
        base = out["monolithic_seconds"]
        out["flow_through_export_vs_baseline"] = out["flow_through_export_seconds"] / base
        out["flow_vs_baseline"] = out["flow_seconds"] / base
        if "flow_cached_seconds" in out:
            out["cached_vs_baseline"] = out["flow_cached_seconds"] / base
    return out


def amax_agreement(workdir: Path) -> dict[str, Any]:
    """The flow's merged amax against the baseline's, bit for bit."""
    import torch

    from quantdag.quantizer_state import STATE_FILE, load_state

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
    threads = results.get("flow_cached_threads")
    if threads:
        summary["flow_cached_threads_seconds"] = threads["wall_seconds"]
        if mono:
            summary["cached_threads_vs_baseline"] = threads["wall_seconds"] / mono["work_seconds"]
    if mono and cold:
        base = mono["work_seconds"]
        summary["flow_vs_baseline"] = cold["wall_seconds"] / base
        summary["flow_through_export_vs_baseline"] = (summary["flow_through_export_seconds"] or math.nan) / base
        summary["flow_process_vs_baseline_process"] = cold["process_seconds"] / mono["process_seconds"]
        summary["amax_flow_vs_baseline"] = amax_agreement(workdir)
    if mono and cached:
        summary["cached_vs_baseline"] = cached["wall_seconds"] / mono["work_seconds"]
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
                              ("cached_vs_baseline", "cached_vs_baseline", "<="),
                              ("cached_threads_vs_baseline", "cached_vs_baseline", "<=")):
        if key in summary:
            lines.append(f"| {key} | {summary[key]:.3f} | {sign} {TARGETS[target]} |")
    if "calibration_vs_plain" in summary:
        for variant, ratios in summary["calibration_vs_plain"].items():
            lines.append(f"| calibration ({variant}) vs plain, both loops | {ratios['both']:.3f} | >= {TARGETS['calibration_vs_plain']} |")
    extra = summary.get("extrapolated", {})
    for key in ("flow_vs_baseline", "flow_through_export_vs_baseline", "cached_vs_baseline"):
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="inputs, stores, logs (reused)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny model (CPU smoke test)")
    parser.add_argument("--image-text-rows", type=int, default=32)
    parser.add_argument("--text-rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per calibration variant (best kept)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--stages", default=",".join(STAGE_ORDER), help=f"subset of {','.join(STAGE_ORDER)}")
    parser.add_argument("--prepare-only", action="store_true", help="build the checkpoint and corpora, run nothing")
    args = parser.parse_args(argv)
    stages = [s for s in STAGE_ORDER if s in args.stages.split(",")]
    workdir = args.workdir.resolve()
    for stale in ("artifacts", "prefect-home", "stage-store", "monolithic", "logs", "mlruns"):
        shutil.rmtree(workdir / stale, ignore_errors=True)  # a cold run starts cold; inputs are kept
    for stale in ("mlflow.db", "trace.jsonl"):
        (workdir / stale).unlink(missing_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = prepare(workdir, args)
    prepared = time.perf_counter() - start
    if args.prepare_only:
        print(json.dumps({"inputs_seconds": prepared, **{k: str(v) for k, v in paths.items()}}, indent=1))
        return {}
    profile = make_profile(workdir, paths, args)
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "QUANTDAG_TASK_RETRIES": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # no Prefect GPU slots: nothing else shares this GPU
    spec = {"profile": json.loads(profile.model_dump_json(exclude_defaults=True)), "device": args.device, "repeats": args.repeats,
            "stage_store": str(workdir / "stage-store"), "monolithic_dir": str(workdir / "monolithic"),
            "trace": str(workdir / "trace.jsonl")}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    from mlflow.tracking import MlflowClient

    MlflowClient(profile.tracking_uri).search_experiments()  # create the tracking DB before any timing
    results: dict[str, Any] = {"inputs_seconds": prepared, "args": vars(args) | {"workdir": str(workdir), "out": str(args.out)}}
    server = PrefectServer(workdir / "prefect-home", workdir / "logs" / "prefect-server.log", env) \
        if any(s.startswith("flow") for s in stages) else None
    try:
        if server:
            env["PREFECT_API_URL"] = server.url
            results["prefect_server_start_seconds"] = server.start_seconds
        for stage in stages:
            results[stage] = run_stage(stage, spec_path, workdir, env, results)
            args.out.write_text(json.dumps(results, indent=1, default=str))  # partial results survive a failure
    finally:
        if server:
            server.stop()
    results["summary"] = summarize(results, workdir, args)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(report(results["summary"], results))
    return results


if __name__ == "__main__":
    main()
