"""The quantize flow against a one-process ModelOpt script, on one GPU, same checkpoint and rows.

    python -m benchmarks.gpu_flow_vs_monolithic --workdir /tmp/bench --out results.json --layers 4

Builds (once) a synthetic checkpoint at Qwen3.6-27B widths with ``--layers`` decoder layers
(``benchmarks.build_model``) and generated calibration data in the real datasets' layouts
(``quantdag.demo.corpus``: ``--image-text-rows`` image-text rows, ``--text-rows`` text rows cut
to ``--seq-len`` tokens), starts a Prefect server (SQLite) and uses MLflow on SQLite with
artifacts on local disk, then runs, each in a process of its own (``benchmarks.bench_stages``):

0. ``warmup``: both loops once, plain and calibrating, timings discarded (Triton's kernel cache
   is then warm for every later stage; run it first when ``calibration`` is left out);
1. ``calibration``: plain BF16 forward speed of both calibration loops vs max calibration
   (ModelOpt as is / weight quantizers off in the loop / ``quantdag.calibration.fast_max`` fast path);
2. ``monolithic``: the baseline, load + ``mtq.quantize`` (image-text and text loops) + export;
3. ``flow`` cold: ``flows.quantize.quantize`` on a fresh artifact store and result cache;
4. ``flow`` cached: the same call again (every step a cache hit);
5. ``flow_2gpu`` (on a machine with 2 GPUs): ``calibration_gpus: 2``, the two branches as two tasks
   in two worker processes, one GPU each; the calibration stage's wall time against the cold
   run's (one GPU, both branches on one model load);
6. ``agreement``: the cold run's exported files against ModelOpt's in-memory model
   (``benchmarks.file_vs_fakequant``).

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

from benchmarks.bench_report import merged_state, report, summarize

REPO = Path(__file__).resolve().parents[1]
STAGE_ORDER = ("warmup", "calibration", "monolithic", "flow_cold", "flow_cached", "flow_2gpu", "agreement")


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
        eval=EvalSpec(path=str(paths["eval"]), seq_len=args.eval_seq_len, max_windows=args.eval_windows),
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


def _gpu_count() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 without a driver); the driver process never initialises CUDA."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


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
    command = {"flow_cold": "flow", "flow_cached": "flow"}.get(stage, stage)
    return [sys.executable, "-m", "benchmarks.bench_stages", command, "--spec", str(spec_path), "--out", str(out)]


def run_stage(stage: str, spec_path: Path, workdir: Path, env: dict[str, str], results: dict[str, Any]) -> dict[str, Any]:
    """One stage in a fresh interpreter; its JSON result plus the process's own wall time."""
    out, log = workdir / f"{stage}.json", workdir / "logs" / f"{stage}.log"
    command = stage_command(stage, spec_path, out, json.loads(spec_path.read_text()), results)
    start = time.perf_counter()
    if stage == "flow_2gpu":  # two GPUs, each with its Prefect limit (bench_stages creates them)
        env = {**env, "CUDA_VISIBLE_DEVICES": "0,1"}
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"stage {stage} failed ({done.returncode}); last lines of {log}:\n{log.read_text()[-4000:]}")
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="inputs, stores, logs (reused)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny model (CPU smoke test)")
    parser.add_argument("--image-text-rows", type=int, default=32)
    parser.add_argument("--text-rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=1, help="evaluation windows of the flow's evaluate step")
    parser.add_argument("--eval-seq-len", type=int, default=128, help="tokens per evaluation window")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per calibration variant (best kept)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--stages", default=",".join(STAGE_ORDER),
                        help=f"stages of {','.join(STAGE_ORDER)} to run, in the order given")
    parser.add_argument("--prepare-only", action="store_true", help="build the checkpoint and corpora, run nothing")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s in STAGE_ORDER]  # in the order given
    if "flow_2gpu" in stages and (args.device != "cuda" or _gpu_count() < 2):
        print(f"skipping flow_2gpu: it needs 2 GPUs, this machine has {_gpu_count()}")
        stages.remove("flow_2gpu")
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
            try:
                results[stage] = run_stage(stage, spec_path, workdir, env, results)
            except RuntimeError as err:  # report it with the stages that worked, then go on
                print(err, file=sys.stderr)
                results.setdefault("failed", {})[stage] = str(err)[-4000:]
            args.out.write_text(json.dumps(results, indent=1, default=str))  # partial results survive a failure
    except KeyboardInterrupt:  # a deadline (timeout --signal=INT): report the stages that finished
        results["interrupted"] = [s for s in stages if s not in results]
        print(f"interrupted; stages not run or not finished: {results['interrupted']}")
    finally:
        if server:
            server.stop()
    results["summary"] = summarize(results, workdir, args)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(report(results["summary"], results))
    return results


if __name__ == "__main__":
    main()
