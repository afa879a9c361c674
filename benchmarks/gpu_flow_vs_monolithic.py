"""The quantize flow against a one-process ModelOpt script, on one GPU, same checkpoint and rows.

    python -m benchmarks.gpu_flow_vs_monolithic --workdir /tmp/bench --out results.json --layers 4
    # 64 layers, one part per command on the same workdir, results merged into one JSON:
    python -m benchmarks.gpu_flow_vs_monolithic --workdir /root/bench --out /root/bench/bench.json --layers 64 \
        --model-dir /dev/shm/q27b --fill pool --warmup-layers 4 --drop-exports --stages warmup,floor,monolithic
    python -m benchmarks.gpu_flow_vs_monolithic ... --stages flow_cold,flow_cached
    python -m benchmarks.gpu_flow_vs_monolithic ... --stages flow_budget --budget-gib 32
    python -m benchmarks.gpu_flow_vs_monolithic --out /root/bench/bench.json --workdir /root/bench --report-only

Builds (once) a synthetic checkpoint at Qwen3.6-27B widths with ``--layers`` decoder layers
(``benchmarks.build_model``; in ``--model-dir``, which may live outside the workdir, e.g. in
``/dev/shm``, and is only read: nothing copies it) and generated calibration data in the real datasets' layouts
(``quantdag.demo.corpus``: ``--image-text-rows`` image-text rows, ``--text-rows`` text rows cut
to ``--seq-len`` tokens), starts a Prefect server (SQLite) and uses MLflow on SQLite with
artifacts on local disk, then runs, each in a process of its own (``benchmarks.bench_stages``):

0. ``warmup``: both loops once, plain and calibrating, timings discarded (Triton's kernel cache
   is then warm for every later stage; run it first when ``calibration`` is left out); with
   ``--warmup-layers N`` on a checkpoint of N layers at the same widths (the same kernels),
   written for it and deleted after;
   ``floor``: the machine's rates for the physical floor (``bench_stages.floor``);
1. ``calibration``: plain BF16 forward speed of both calibration loops vs max calibration
   (ModelOpt as is / weight quantizers off in the loop / ``quantdag.calibration.fast_max`` fast path);
2. ``monolithic``: the baseline, load + ``mtq.quantize`` (image-text and text loops) + export;
3. ``flow`` cold: ``flows.quantize.quantize`` on a fresh artifact store and result cache;
4. ``flow`` cached: the same call again (every step a cache hit);
   ``flow_budget``: the cold flow with ``placement.memory_budget_gib = --budget-gib`` on a fresh
   artifact store of its own (``artifacts-budget``; ``--budget-image-text-rows`` /
   ``--budget-text-rows`` calibration rows), every step's peak GPU memory against the budget;
5. ``flow_2gpu`` (on a machine with 2 GPUs): the cold flow on a fresh store of its own
   (``artifacts-2gpu``) with ``calibration_gpus: 2`` and each branch in 2 shards: one call per GPU
   (the first in the flow's process on the reference's model, the other in a worker bound to GPU 1
   that preloaded the base while the reference ran); the calibration stage's wall time against the
   cold run's (one GPU, both branches on one model load), and each GPU's utilisation over it;
6. ``agreement``: the cold run's exported files against ModelOpt's in-memory model
   (``benchmarks.file_vs_fakequant``).

Prints per run and step seconds, tokens/s, peak GPU memory and model loads (from each step's
MLflow child run), the ratios against the targets (flow <= 1.05x baseline cold, cached rerun <=
0.02x, calibration >= 0.9x plain forward, every step's peak GPU memory <= the budget, or <= 1.15x
the BF16 weights without one), the physical floor and each run against 2x it, an extrapolation to
64 layers (below 64), and whether the flow's merged amax equal the baseline's bit for bit.

Each invocation runs the ``--stages`` it is given and merges their results into ``--out`` (kept
from earlier invocations on the same workdir; ``--fresh`` starts it anew); a stage starts cold by
removing only what it writes (``monolithic``: the baseline's export and rows; ``flow_cold``: the
artifact store, Prefect's home and the MLflow database; ``flow_budget``: its own store).
``--report-only`` prints the table of ``--out`` (and ``--merge-from`` files) without running anything
or writing ``--out`` (e.g. on JSON fetched from the GPU machine; the amax comparisons are then
those summarised there).
``--drop-exports`` deletes the baseline's export after its stage and the cold flow's checkpoint
before ``flow_budget`` (their bytes are recorded first), for disks that hold one export at a time.
``--tiny`` runs the demo's tiny model instead (CPU smoke test).
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
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.bench_report import merged_state, report, summarize

REPO = Path(__file__).resolve().parents[1]
STAGE_ORDER = ("warmup", "floor", "calibration", "monolithic", "flow_cold", "flow_cached", "flow_budget", "flow_2gpu",
               "agreement")
COLD = {"monolithic": ("monolithic", "stage-store"), "flow_cold": ("artifacts", "prefect-home", "mlruns", "mlflow.db",
                                                                   "trace.jsonl"),
        "flow_budget": ("artifacts-budget", "trace-budget.jsonl"), "flow_2gpu": ("artifacts-2gpu", "trace-2gpu.jsonl")}
"""What each stage removes before it runs (relative to the workdir), so that it starts cold."""


# ----------------------------------------------------------------------------------- inputs
def ensure_model(model_dir: Path, layers: int, tiny: bool, fill: str) -> tuple[dict[str, Any], bool]:
    """Build the checkpoint in ``model_dir`` unless the record beside it (``<model_dir>.built.json``,
    written last) says it holds these layers and fill; returns that record and whether it built now."""
    from benchmarks.build_model import build_model

    wanted = {"layers": layers, "tiny": tiny, "fill": fill}
    record = model_dir.with_name(model_dir.name + ".built.json")
    if record.is_file() and model_dir.is_dir():
        kept = json.loads(record.read_text())
        if {k: v for k, v in kept.items() if k in wanted} == wanted:
            return kept, False
    record.unlink(missing_ok=True)
    built = {**build_model(model_dir, layers, tiny=tiny, fill=fill), **wanted}
    record.write_text(json.dumps(built, indent=1))
    return built, True


def prepare(workdir: Path, args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Any], bool]:
    """Checkpoint (in ``--model-dir``) and corpora under ``workdir`` (each reused when complete);
    the paths, the checkpoint's build record and whether it was built now."""
    from quantdag.demo.corpus import IMAGE_TEXT_SUBSETS, write_eval_text, write_image_text_mirror, write_text_mirror

    paths = {"model": model_path(workdir, args), "mirror": workdir / "nemotron-vlm-mirror",
             "text": workdir / "cnn_dailymail" / "train.jsonl", "eval": workdir / "heldout.txt"}
    record, built = ensure_model(paths["model"], args.layers, args.tiny, args.fill)
    image_rows = max(args.image_text_rows, args.budget_image_text_rows or 0)
    text_rows = max(args.text_rows, args.budget_text_rows or 0)
    marker = workdir / f".inputs-{'tiny' if args.tiny else 'qwen36'}-{image_rows}-{text_rows}"
    if not marker.is_file():
        per_subset = math.ceil(image_rows / len(IMAGE_TEXT_SUBSETS))
        write_image_text_mirror(paths["mirror"], rows_per_subset=per_subset, seed=0)
        write_text_mirror(paths["text"], n=text_rows, seed=0)
        write_eval_text(paths["eval"], n_paragraphs=60, seed=0)
        marker.write_text("ok\n")
    return paths, record, built


def model_path(workdir: Path, args: argparse.Namespace) -> Path:
    """``--model-dir`` (absolute), or ``workdir/model``."""
    return args.model_dir.resolve() if args.model_dir else workdir / "model"


def make_profile(workdir: Path, paths: dict[str, Path], args: argparse.Namespace, *, store: str = "artifacts",
                 budget_gib: float | None = None, image_text_rows: int | None = None,
                 text_rows: int | None = None) -> Any:
    from conf.schema import EvalSpec, ImageTextSource, PlacementSpec, Profile, TextSource

    return Profile(
        name="gpu-bench",
        base={"local_dir": str(paths["model"])},
        image_text=ImageTextSource(path=str(paths["mirror"]), num_samples=image_text_rows or args.image_text_rows,
                                   **({"max_image_pixels": 128 * 128, "max_text_tokens": 64} if args.tiny else {})),
        text=TextSource(path=str(paths["text"]), num_samples=text_rows or args.text_rows, seq_len=args.seq_len),
        eval=EvalSpec(path=str(paths["eval"]), seq_len=args.eval_seq_len, max_windows=args.eval_windows),
        artifact_store=str(workdir / store),
        tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
        device=args.device,
        placement=PlacementSpec(memory_budget_gib=budget_gib),
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
    command = {"flow_cold": "flow", "flow_cached": "flow", "flow_budget": "flow"}.get(stage, stage)
    return [sys.executable, "-m", "benchmarks.bench_stages", command, "--spec", str(spec_path), "--out", str(out)]


def run_stage(stage: str, spec_path: Path, workdir: Path, env: dict[str, str], results: dict[str, Any]) -> dict[str, Any]:
    """One stage in a fresh interpreter; its JSON result plus the process's own wall time."""
    out, log = workdir / f"{stage}.json", workdir / "logs" / f"{stage}.log"
    out.unlink(missing_ok=True)
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


def base_copies(workdir: Path, model: Path) -> list[str]:
    """Files under ``workdir`` (outside the model directory) with a base safetensors file's name and size."""
    sizes = {(p.name, p.stat().st_size) for p in model.glob("*.safetensors")}
    found = []
    for root, _, files in os.walk(workdir):
        if Path(root).resolve().is_relative_to(model):
            continue
        found += [str(Path(root) / f) for f in files
                  if f.endswith(".safetensors") and (f, (Path(root) / f).stat().st_size) in sizes]
    return sorted(found)


def offload_dirs() -> dict[str, float]:
    """Bytes of each ``quantdag-offload-*`` folder in the temporary directory (weights placed on ``disk``)."""
    found = {}
    for folder in Path(tempfile.gettempdir()).glob("quantdag-offload-*"):
        found[str(folder)] = float(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    return found


def disk(paths: list[Path]) -> dict[str, float]:
    """Free bytes of the filesystem of each path (the workdir, the model directory, /tmp)."""
    return {str(p): float(shutil.disk_usage(p).free) for p in paths if p.exists()}


def build_warmup_model(workdir: Path, args: argparse.Namespace, paths: dict[str, Path], spec: dict[str, Any]) -> Path:
    """A checkpoint of ``--warmup-layers`` layers at the same widths and its spec (the warmup stage's)."""
    from benchmarks.build_model import build_model

    small = workdir / "warmup-model"
    build_model(small, args.warmup_layers, tiny=args.tiny, fill="pool", tokenizer_dir=paths["model"])
    warm_profile = {**spec["profile"], "base": {"local_dir": str(small)}}
    warm_spec = workdir / "spec-warmup.json"
    warm_spec.write_text(json.dumps({**spec, "profile": warm_profile, "stage_store": str(workdir / "stage-store-warmup")},
                                    indent=1))
    return warm_spec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="corpora, stores, logs, results of each stage (reused)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results, merged across invocations")
    parser.add_argument("--report-file", type=Path, default=None, help="also write the printed report here")
    parser.add_argument("--model-dir", type=Path, default=None, help="checkpoint directory (default WORKDIR/model)")
    parser.add_argument("--fill", choices=("random", "pool"), default="random",
                        help="how benchmarks.build_model fills the weights (pool: fast, for large checkpoints)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny model (CPU smoke test)")
    parser.add_argument("--image-text-rows", type=int, default=32)
    parser.add_argument("--text-rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=1, help="evaluation windows of the flow's evaluate step")
    parser.add_argument("--eval-seq-len", type=int, default=128, help="tokens per evaluation window")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per calibration variant (best kept)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--stages", default=",".join(s for s in STAGE_ORDER if s != "flow_budget"),
                        help=f"stages of {','.join(STAGE_ORDER)} to run, in the order given")
    parser.add_argument("--budget-gib", type=float, default=32.0, help="placement.memory_budget_gib of flow_budget")
    parser.add_argument("--budget-image-text-rows", type=int, default=None, help="flow_budget's (default --image-text-rows)")
    parser.add_argument("--budget-text-rows", type=int, default=None, help="flow_budget's (default --text-rows)")
    parser.add_argument("--warmup-layers", type=int, default=None,
                        help="run the warmup stage on a checkpoint of this many layers (default: the benchmark's)")
    parser.add_argument("--floor-read-gb", type=float, default=None, help="cap on the base bytes the floor stage reads")
    parser.add_argument("--floor-write-gb", type=float, default=4.0, help="bytes the floor stage writes and fsyncs")
    parser.add_argument("--drop-exports", action="store_true",
                        help="delete the baseline's export after its stage and the cold flow's checkpoint before flow_budget")
    parser.add_argument("--fresh", action="store_true", help="start --out anew instead of merging into it")
    parser.add_argument("--report-only", action="store_true", help="print the report of --out (+ --merge-from); run nothing")
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[], help="more result JSONs to merge (report)")
    parser.add_argument("--prepare-only", action="store_true", help="build the checkpoint and corpora, run nothing")
    return parser


def load_results(paths: list[Path]) -> dict[str, Any]:
    """Stage results merged from ``paths`` in order (a later file's stage replaces an earlier one's)."""
    merged: dict[str, Any] = {}
    for path in paths:
        if path.is_file():
            data = json.loads(path.read_text())
            failed = {**merged.get("failed", {}), **data.get("failed", {})}
            merged |= data
            for stage in STAGE_ORDER:
                if stage in merged and stage not in data.get("failed", {}):
                    failed.pop(stage, None)
            if failed:
                merged["failed"] = failed
            else:
                merged.pop("failed", None)
    return merged


def finish(results: dict[str, Any], workdir: Path | None, args: argparse.Namespace, write: bool = True) -> dict[str, Any]:
    """Summarise ``results``, write them to ``--out`` (unless ``write`` is False) and print the report."""
    layout = results.get("args", {})
    shape = argparse.Namespace(layers=int(layout.get("layers", args.layers)), tiny=bool(layout.get("tiny", args.tiny)))
    results["summary"] = summarize(results, workdir, shape)
    if write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
    text = report(results["summary"], results)
    if args.report_file:
        args.report_file.write_text(text + "\n")
    print(text)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    workdir = args.workdir.resolve()
    if args.report_only:
        results = load_results([args.out, *args.merge_from])
        if not results:
            raise SystemExit(f"no results in {args.out} {args.merge_from}")
        return finish(results, workdir, args, write=False)  # --out may be read-only (results fetched elsewhere)
    stages = [] if args.prepare_only else [s for s in args.stages.split(",") if s in STAGE_ORDER]  # in the order given
    for stage in stages:  # a stage starts cold; inputs and other stages' outputs are kept
        for stale in COLD.get(stage, ()):
            path = workdir / stale
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths, record, built = prepare(workdir, args)
    prepared = time.perf_counter() - start
    if args.prepare_only:
        print(json.dumps({"inputs_seconds": prepared, "model_build": record, "built_now": built,
                          **{k: str(v) for k, v in paths.items()}}, indent=1))
        return {}
    if "flow_2gpu" in stages and (args.device != "cuda" or _gpu_count() < 2):
        print(f"skipping flow_2gpu: it needs 2 GPUs, this machine has {_gpu_count()}")
        stages.remove("flow_2gpu")
    profile = make_profile(workdir, paths, args)
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "QUANTDAG_TASK_RETRIES": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": os.environ.get(
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # no Prefect GPU slots: nothing else shares this GPU
    spec = {"profile": json.loads(profile.model_dump_json(exclude_defaults=True)), "device": args.device, "repeats": args.repeats,
            "stage_store": str(workdir / "stage-store"), "monolithic_dir": str(workdir / "monolithic"),
            "trace": str(workdir / "trace.jsonl"),
            "floor": {"read_bytes": args.floor_read_gb * 1e9 if args.floor_read_gb else None,
                      "write_bytes": int(args.floor_write_gb * 1e9), "write_dir": str(workdir)}}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    specs = {stage: spec_path for stage in stages}
    if "flow_budget" in stages:
        budget = make_profile(workdir, paths, args, store="artifacts-budget", budget_gib=args.budget_gib,
                              image_text_rows=args.budget_image_text_rows, text_rows=args.budget_text_rows)
        specs["flow_budget"] = workdir / "spec-budget.json"
        specs["flow_budget"].write_text(json.dumps({**spec, "profile": json.loads(budget.model_dump_json(exclude_defaults=True)),
                                                    "trace": str(workdir / "trace-budget.jsonl")}, indent=1))
    if "flow_2gpu" in stages:  # cold as well: a store of its own, so fetch and the reference run (and preloads start)
        two = make_profile(workdir, paths, args, store="artifacts-2gpu")
        specs["flow_2gpu"] = workdir / "spec-2gpu.json"
        specs["flow_2gpu"].write_text(json.dumps({**spec, "profile": json.loads(two.model_dump_json(exclude_defaults=True)),
                                                  "trace": str(workdir / "trace-2gpu.jsonl")}, indent=1))
    results = {} if args.fresh else load_results([args.out])
    invocation = {"stages": stages, "inputs_seconds": prepared, "model_built": built, "started": time.time()}
    results["invocations"] = [*results.get("invocations", []), invocation]
    results["args"] = vars(args) | {"workdir": str(workdir), "out": str(args.out), "model_dir": str(paths["model"])}
    results["model_build"] = record
    watched = [workdir, paths["model"], Path(tempfile.gettempdir())]
    rows = {"default": {"image_text": args.image_text_rows, "text": args.text_rows},
            "flow_budget": {"image_text": args.budget_image_text_rows or args.image_text_rows,
                            "text": args.budget_text_rows or args.text_rows}}
    results.pop("interrupted", None)
    server, done = None, []
    try:
        if any(s.startswith("flow") for s in stages):
            from mlflow.tracking import MlflowClient

            MlflowClient(profile.tracking_uri).search_experiments()  # create the tracking DB before any timing
            server = PrefectServer(workdir / "prefect-home", workdir / "logs" / "prefect-server.log", env)
            env["PREFECT_API_URL"] = server.url
            invocation["prefect_server_start_seconds"] = results["prefect_server_start_seconds"] = server.start_seconds
        for stage in stages:
            before = disk(watched)
            results.pop(stage, None)  # an earlier invocation's result of this stage no longer holds
            try:
                if stage == "warmup" and args.warmup_layers:
                    specs[stage] = build_warmup_model(workdir, args, paths, spec)
                if stage == "flow_budget" and args.drop_exports:
                    shutil.rmtree(workdir / "artifacts" / "objects" / "checkpoint", ignore_errors=True)
                if stage == "flow_cached" and "flow_cold" not in results:
                    print("flow_cached without a flow_cold result in --out: its store may not be warm", file=sys.stderr)
                result = run_stage(stage, specs[stage], workdir, env, results)
                result["calibration_rows"] = rows[stage] if stage == "flow_budget" else rows["default"]
                result["disk_free_before"], result["disk_free_after"] = before, disk(watched)
                results[stage] = result
                done.append(stage)
                results.get("failed", {}).pop(stage, None)
            except RuntimeError as err:  # report it with the stages that worked, then go on
                print(err, file=sys.stderr)
                results.setdefault("failed", {})[stage] = str(err)[-4000:]
            finally:
                if stage == "warmup" and args.warmup_layers:
                    shutil.rmtree(workdir / "warmup-model", ignore_errors=True)
                if stage == "monolithic" and args.drop_exports:
                    shutil.rmtree(workdir / "monolithic" / "export", ignore_errors=True)
            if stage.startswith("flow"):
                results["base_copies"] = base_copies(workdir, paths["model"])
                results["offload_dirs"] = offload_dirs()
            args.out.write_text(json.dumps(results, indent=1, default=str))  # partial results survive a failure
    except KeyboardInterrupt:  # a deadline (timeout --signal=INT): report the stages that finished
        invocation["interrupted"] = results["interrupted"] = [s for s in stages if s not in done]
        print(f"interrupted; stages not run or not finished: {results['interrupted']}")
    finally:
        if server:
            server.stop()
    return finish(results, workdir, args)


if __name__ == "__main__":
    main()
