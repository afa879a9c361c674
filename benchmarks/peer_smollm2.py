"""Peer comparison on real weights: quantdag vs a plain ModelOpt script vs llm-compressor (NVFP4).

Model: SmolLM2-135M-Instruct (``conf/profiles/smollm2-nvfp4.yaml``: the GGUF that ``quantdag
fetch-smollm2`` puts under ``~/.quantdag/models/smollm2``, dequantized to BF16 by transformers).
Calibration: the profile's 15 real ``cnn_dailymail`` rows, each tokenized with the model's
tokenizer and cut to 512 tokens, the same token ids for all three methods.

1. **quantdag**: the project's plain step functions, in the flow's order: ``fetch_text`` ->
   ``calibrate`` (``text``) -> ``merge_amax`` -> ``export_checkpoint`` (ModelOpt under the hood,
   one model load per step).
2. **plain ModelOpt**: one script, one model load: ``mtq.quantize`` with the same config
   (``quantdag.calibration.recipe.build_quant_config``) and a forward loop over the same ids through the
   decoder, then ``export_hf_checkpoint``. Run twice: calibrating in float32, as quantdag's
   ``calibrate`` does on a CPU (expected to equal 1; the max absolute differences of
   ``input_scale`` and ``weight_scale_2`` are reported), and in BF16, as a script that never
   upcasts does and as llm-compressor does with a BF16 model.
3. **llm-compressor**: ``oneshot`` with ``QuantizationModifier(targets="Linear", scheme="NVFP4",
   ignore=["lm_head"])`` in a separate virtual environment (llm-compressor 0.14 needs
   transformers >= 5.15 and torch <= 2.14.0; the project pins transformers < 5.15 and torch
   2.14.1), created under ``~/.cache/quantdag`` on first use and reused. Its compressed-tensors
   checkpoint is converted to ModelOpt's layout by ``benchmarks/peer_convert.py`` (the global
   scales are the reciprocals of ModelOpt's).

Every checkpoint is then read by ``quantdag.format.reader`` (E2M1 weights, E4M3 block scales, per-16
dynamic activation scales relative to ``input_scale``) and compared with the BF16 model on
WikiText-2 windows by ``tasks.evaluate`` (``eval_windows``) and ``quantdag.evaluation.logprobs`` (``compare_logits``, ``summarise``),
float32 on the CPU. The profile's recipe also has an FP8 KV cache (``fp8_cast``); llm-compressor's
NVFP4 scheme has none, so the quantdag export is also evaluated with K/V unquantized, and the
BF16-calibrated ModelOpt export only that way. Everything runs on the CPU (``device="cpu"``).

Usage, from the repository root (reads ``../shared/data``; exits when it is absent)::

    nice -n 10 .venv/bin/python -m benchmarks.peer_smollm2 --json /tmp/peer_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
"""The llm-compressor release measured (it installs compressed-tensors 0.19.0)."""
LLMCOMPRESSOR_TORCH = "torch==2.13.0"
"""Installed first: a CPU wheel on local disk that satisfies llm-compressor's torch <= 2.14.0."""
DEFAULT_VENV = Path.home() / ".cache" / "quantdag" / "llmcompressor-venv"
JOB = Path(__file__).resolve().parent / "peer_llmcompressor_job.py"
PROFILE = "smollm2-nvfp4"


class PeerUnavailable(RuntimeError):
    """llm-compressor could not be installed or run, or its checkpoint not converted; the message says why."""


@dataclass
class Method:
    """One row of the table: how a checkpoint was made and how it is read.

    Attributes:
        name: label in the table.
        export_dir: ModelOpt-layout export, or None for the BF16 reference or a failed method.
        fake_quant_kv: evaluate with the export's FP8 KV cache emulated.
        quantize_seconds: wall time to produce the export (None for BF16).
        error: why the method has no numbers, or None.
        metrics: filled by :func:`evaluate_methods`.
        same_files_as: name of an earlier method whose export has byte-identical safetensors and
            the same KV setting; its metrics were copied rather than computed again.
    """

    name: str
    export_dir: Path | None = None
    fake_quant_kv: bool = True
    quantize_seconds: float | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    same_files_as: str | None = None


def calibration_ids(tokenizer: Any, rows: list[dict[str, Any]], text_field: str, seq_len: int) -> list[torch.Tensor]:
    """Token ids ``int64 [1, <= seq_len]`` per row, tokenized as ``tasks.calibrate.text_loop`` does."""
    return [tokenizer(row[text_field], return_tensors="pt", truncation=True, max_length=seq_len)["input_ids"] for row in rows]


def run_quantdag(profile: Any, base: Any, store: Any) -> tuple[Path, float, Any]:
    """Step 1: fetch -> calibrate -> merge -> export with the project's functions on the CPU; (export dir, seconds, rows ref)."""
    from tasks.calibrate import calibrate
    from tasks.export import export_checkpoint
    from tasks.fetch import fetch_text
    from tasks.merge import merge_amax

    start = time.perf_counter()
    rows = fetch_text(profile.text, store)
    states = calibrate(base, {"text": rows}, profile.recipe, {"text": profile.text}, store, device="cpu")
    merged = merge_amax(states, store)
    checkpoint = export_checkpoint(base, merged, profile.recipe, store, device="cpu")
    return store.local_dir(checkpoint), time.perf_counter() - start, rows


def run_plain_modelopt(profile: Any, base: Any, ids: list[torch.Tensor], out: Path, calibration_dtype: torch.dtype) -> float:
    """Step 2: the same ModelOpt calls in one plain script (one model load); returns seconds.

    Args:
        calibration_dtype: the dtype the model calibrates in. ``float32`` mirrors quantdag's
            ``calibrate`` on a CPU (BF16 weights upcast exactly, activations in float32);
            ``bfloat16`` is what a script that never upcasts does (and what llm-compressor does
            with a BF16 model), so input amax are maxima of BF16 activations.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantdag.calibration.recipe import build_quant_config

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base.source_dir, gguf_file=base.gguf_file, dtype=torch.bfloat16).eval()
    model.config.architectures = [type(model).__name__]  # empty for GGUF; the export needs it
    model.to(calibration_dtype)

    def forward_loop(quantized: torch.nn.Module) -> None:
        with torch.no_grad():
            for row in ids:
                quantized.model(input_ids=row, use_cache=False)

    model = mtq.quantize(model, build_quant_config(profile.recipe), forward_loop=forward_loop)
    for param in model.parameters():  # exact BF16 values again, so the export stores BF16 as quantdag's does;
        param.data = param.data.to(torch.bfloat16)  # the quantizers' amax are buffers and stay float32
    with torch.no_grad():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    AutoTokenizer.from_pretrained(base.source_dir, gguf_file=base.gguf_file).save_pretrained(out)
    return time.perf_counter() - start


def _tail(path: Path, lines: int = 12) -> str:
    """The last non-empty lines of a log (progress-bar carriage returns split), joined by `` | ``."""
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def ensure_llmcompressor_venv(venv: Path, log: Path) -> Path:
    """The venv's python, (re)building the venv when it lacks a completed install of ``LLMCOMPRESSOR``.

    A build installs ``LLMCOMPRESSOR_TORCH`` first, then ``LLMCOMPRESSOR``, and writes a marker
    file naming the pin only after both succeeded, so an interrupted or failed build is never
    reused (it is removed and built again).

    Raises:
        PeerUnavailable: venv creation or pip failed (the log's last lines are in the message).
    """
    python, marker = venv / "bin" / "python", venv / "quantdag-install.txt"
    probe = "import importlib.metadata as m, llmcompressor; print(m.version('llmcompressor'))"
    if marker.is_file() and marker.read_text().strip() == LLMCOMPRESSOR and python.is_file():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == LLMCOMPRESSOR.split("==")[1]:
            return python
    if venv.exists() and not (venv / "pyvenv.cfg").is_file():
        raise PeerUnavailable(f"{venv} exists and is not a virtual environment; not replacing it")
    shutil.rmtree(venv, ignore_errors=True)
    with log.open("w") as handle:
        for command in ([sys.executable, "-m", "venv", str(venv)],
                        [str(python), "-m", "pip", "install", LLMCOMPRESSOR_TORCH],
                        [str(python), "-m", "pip", "install", LLMCOMPRESSOR]):
            if subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode:
                raise PeerUnavailable(f"`{' '.join(command[-3:])}` failed; last lines of {log}: {_tail(log)}")
    marker.write_text(LLMCOMPRESSOR + "\n")
    return python


def run_llmcompressor(base: Any, ids: list[torch.Tensor], work: Path, venv: Path, timeout: int) -> tuple[Path, float, dict[str, Any]]:
    """Step 3: BF16 directory -> llm-compressor job in its venv -> converted export; (dir, seconds, job report).

    The seconds cover the job (load, calibrate, compress and save) and the conversion, not the
    one-off venv build or the BF16 directory.

    Raises:
        PeerUnavailable: any of the steps failed; the message gives the reason.
    """
    from benchmarks.peer_convert import convert_checkpoint
    from quantdag.model import loading as modeling

    python = ensure_llmcompressor_venv(venv, work / "llmcompressor-pip.log")
    bf16 = work / "bf16-hf"
    modeling.load_model(base, torch.device("cpu"), dtype=torch.bfloat16).model.save_pretrained(bf16)
    modeling.load_tokenizer(base).save_pretrained(bf16)
    (work / "calibration_ids.json").write_text(json.dumps([row[0].tolist() for row in ids]))
    compressed, report, log = work / "llmcompressor-compressed", work / "llmcompressor-report.json", work / "llmcompressor-job.log"
    command = [str(python), str(JOB), "--model", str(bf16), "--calibration", str(work / "calibration_ids.json"),
               "--output", str(compressed), "--report", str(report)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        with log.open("w") as handle:
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise PeerUnavailable(f"llm-compressor job ran past {timeout} s; see {log}") from err
    if result.returncode:
        raise PeerUnavailable(f"llm-compressor job exited with {result.returncode}; last lines of {log}: {_tail(log)}")
    job_report = json.loads(report.read_text())
    try:
        convert_checkpoint(compressed, work / "llmcompressor-export", producer_version=job_report["versions"]["llmcompressor"])
    except ValueError as err:
        raise PeerUnavailable(f"conversion of {compressed} failed: {err}") from err
    return work / "llmcompressor-export", time.perf_counter() - start, job_report


def scale_differences(dir_a: Path, dir_b: Path) -> dict[str, Any]:
    """Compare the NVFP4 tensors of two ModelOpt-layout exports, module by module.

    Returns:
        ``modules`` (quantized in both), ``only_in_a``/``only_in_b``; per ``input_scale`` and
        ``weight_scale_2``: ``max_abs``, ``max_rel`` (relative to ``dir_a``) and the worst module;
        for ``weight`` (packed bytes) and ``weight_scale`` (E4M3 bytes): the fraction of equal bytes;
        ``other_tensors_differing``: names of the remaining tensors (embeddings, norms) present in
        both whose dtype or bytes differ. Each export is expected in one safetensors file.
    """
    from safetensors.torch import load_file

    a, b = (load_file(str(next(d.glob("*.safetensors")))) for d in (dir_a, dir_b))
    mods_a, mods_b = ({k.removesuffix(".weight_scale_2") for k in t if k.endswith(".weight_scale_2")} for t in (a, b))
    common = sorted(mods_a & mods_b)
    out: dict[str, Any] = {"modules": len(common), "only_in_a": sorted(mods_a - mods_b), "only_in_b": sorted(mods_b - mods_a)}
    for suffix in ("input_scale", "weight_scale_2"):
        diffs = {m: (float(a[f"{m}.{suffix}"]), float(b[f"{m}.{suffix}"])) for m in common}
        worst = max(diffs, key=lambda m: abs(diffs[m][0] - diffs[m][1]))
        out[suffix] = {"max_abs": max(abs(x - y) for x, y in diffs.values()),
                       "max_rel": max(abs(x - y) / abs(x) for x, y in diffs.values()), "worst_module": worst}
    for suffix in ("weight", "weight_scale"):
        equal = sum(int((a[f"{m}.{suffix}"].view(torch.uint8) == b[f"{m}.{suffix}"].view(torch.uint8)).sum()) for m in common)
        total = sum(a[f"{m}.{suffix}"].numel() for m in common)
        out[f"{suffix}_bytes_equal"] = equal / total if total else float("nan")
    nvfp4 = {f"{m}.{s}" for m in mods_a | mods_b for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")}
    out["other_tensors_differing"] = sorted(
        k for k in (set(a) & set(b)) - nvfp4
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))
    return out


def evaluate_methods(base: Any, spec: Any, methods: list[Method]) -> dict[str, float]:
    """Fill each method's ``metrics`` on the same windows; returns the BF16 metrics.

    Every window goes through the float32 BF16-base model once and through each export (read by
    ``quantdag.format.reader``, float32) once; ``eval_seconds`` is each model's own forward time. An
    export whose safetensors are byte-identical to an earlier method's (same KV setting) is not
    run again: its metrics are copied and ``same_files_as`` names the method.
    """
    from quantdag.model import loading as modeling
    from quantdag.format.reader import load_nvfp4_model
    from quantdag.runtime.store import file_sha256
    from quantdag.evaluation.logprobs import compare_logits, summarise
    from tasks.evaluate import eval_windows, load_eval_text

    windows = eval_windows(load_eval_text(spec), modeling.load_tokenizer(base), spec)
    reference = modeling.load_model(base, torch.device("cpu"), dtype=torch.float32).model
    runnable: list[Method] = []
    first_with: dict[Any, Method] = {}
    for method in (m for m in methods if m.export_dir is not None and m.error is None):
        key = (tuple(file_sha256(p) for p in sorted(method.export_dir.glob("*.safetensors"))), method.fake_quant_kv)
        if key in first_with:
            method.same_files_as = first_with[key].name
        else:
            first_with[key] = method
            runnable.append(method)
    models = {m.name: load_nvfp4_model(m.export_dir, dtype=torch.float32, fake_quant_kv=m.fake_quant_kv).model.eval()
              for m in runnable}
    keys = ("nll_ref", "nll_cand", "kl", "agree", "tokens")
    totals = {m.name: dict.fromkeys(keys, 0.0) for m in runnable}
    seconds = {m.name: 0.0 for m in runnable} | {"bf16": 0.0}
    with torch.no_grad():
        for i, window in enumerate(windows):
            ids = window[None]
            start = time.perf_counter()
            ref_logits = reference(input_ids=ids, use_cache=False).logits.float()
            seconds["bf16"] += time.perf_counter() - start
            for name, model in models.items():
                start = time.perf_counter()
                logits = model(input_ids=ids, use_cache=False).logits.float()
                seconds[name] += time.perf_counter() - start
                stats = compare_logits(ref_logits, logits, ids)
                totals[name] = {k: totals[name][k] + stats[k] for k in keys}
            print(f"eval window {i + 1}/{windows.shape[0]}", file=sys.stderr, flush=True)
    for method in runnable:
        method.metrics = summarise(totals[method.name]) | {"eval_seconds": seconds[method.name]}
    for method in methods:
        if method.same_files_as is not None:
            method.metrics = dict(next(m for m in runnable if m.name == method.same_files_as).metrics)
    any_totals = next(iter(totals.values()), None)
    bf16 = {"eval_windows": float(windows.shape[0]), "seq_len": float(spec.seq_len), "eval_seconds": seconds["bf16"]}
    if any_totals:
        bf16 |= {"perplexity": summarise(any_totals)["perplexity_bf16"], "eval_tokens": any_totals["tokens"]}
    return bf16


def table(methods: list[Method], bf16: dict[str, float]) -> str:
    """The markdown table: method, perplexity, delta vs BF16 (%), mean KL, top-1 agreement, seconds."""
    lines = ["| method | perplexity | Δppl vs BF16 | mean KL (nats) | top-1 agree | quantize s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| BF16 (GGUF dequantized) | {bf16.get('perplexity', float('nan')):.3f} | 0 | 0 | 1 | - | {bf16['eval_seconds']:.0f} |"]
    for m in methods:
        if m.error is not None:
            lines.append(f"| {m.name} | failed: {m.error.splitlines()[0][:200]} | | | | | |")
            continue
        x = m.metrics
        delta = 100.0 * (x["perplexity_ratio"] - 1.0)
        eval_s = f"{x['eval_seconds']:.0f}" if m.same_files_as is None else f"files = {m.same_files_as.split(' (')[0]}"
        lines.append(f"| {m.name} | {x['perplexity_nvfp4']:.3f} | {delta:+.2f}% | {x['kl_mean']:.4f} | "
                     f"{x['top1_agreement']:.4f} | {m.quantize_seconds:.0f} | {eval_s} |")
    return "\n".join(lines)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results as JSON")
    parser.add_argument("--work-dir", type=Path, help="keep the checkpoints here (default: a temporary directory)")
    parser.add_argument("--windows", type=int, help="WikiText-2 windows of 512 tokens (default: the profile's eval.max_windows)")
    parser.add_argument("--llmcompressor-venv", type=Path, default=DEFAULT_VENV, help=f"default {DEFAULT_VENV}")
    parser.add_argument("--llmcompressor-timeout", type=int, default=3600, help="seconds allowed for the llm-compressor job")
    parser.add_argument("--skip-llmcompressor", action="store_true", help="leave llm-compressor out (its row says so)")
    return parser.parse_args()


def _load_inputs(windows: int | None) -> tuple[Any, Any]:
    """The profile (eval windows overridden) and its resolved base; exits with a message when data is absent."""
    from conf import load_profile
    from quantdag.model.loading import resolve_base

    profile = load_profile(PROFILE, overrides={"eval": {"max_windows": windows}} if windows else None)
    missing = [p for p in (profile.text.path, profile.eval.path) if not Path(p).is_file()]
    if missing:
        sys.exit(f"peer_smollm2: shared data not found ({', '.join(missing)}); this benchmark needs ../shared/data "
                 "beside the repository (or QUANTDAG_DATA pointing at it)")
    try:
        return profile, resolve_base(profile.base)
    except ValueError as err:
        sys.exit(f"peer_smollm2: {err}; run `quantdag fetch-smollm2` first")


def main() -> None:
    """Run the three methods, evaluate them, print the table and write the JSON."""
    args = _parse_args()
    profile, base = _load_inputs(args.windows)
    from quantdag.model import loading as modeling
    from quantdag.runtime.store import ArtifactStore
    from tasks.fetch import read_rows

    with tempfile.TemporaryDirectory(prefix="peer-smollm2-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        store = ArtifactStore(str(work / "artifacts"))
        quantdag_dir, quantdag_s, rows_ref = run_quantdag(profile, base, store)
        ids = calibration_ids(modeling.load_tokenizer(base), read_rows(store, rows_ref)[1], profile.text.text_field, profile.text.seq_len)
        plain_dir, plain_bf16_dir = work / "plain-modelopt-export", work / "plain-modelopt-bf16-export"
        plain_s = run_plain_modelopt(profile, base, ids, plain_dir, torch.float32)
        plain_bf16_s = run_plain_modelopt(profile, base, ids, plain_bf16_dir, torch.bfloat16)
        methods = [Method("quantdag (NVFP4 W4A4 + FP8 KV)", quantdag_dir, True, quantdag_s),
                   Method("plain ModelOpt script, float32 calibration (NVFP4 W4A4 + FP8 KV)", plain_dir, True, plain_s),
                   Method("quantdag, KV unquantized (NVFP4 W4A4)", quantdag_dir, False, quantdag_s),
                   Method("plain ModelOpt script, BF16 calibration, KV unquantized", plain_bf16_dir, False, plain_bf16_s)]
        llmc = Method("llm-compressor NVFP4 (W4A4, KV unquantized)", fake_quant_kv=False)
        job_report: dict[str, Any] = {}
        if args.skip_llmcompressor:
            llmc.error = "skipped (--skip-llmcompressor)"
        else:
            try:
                llmc.export_dir, llmc.quantize_seconds, job_report = run_llmcompressor(
                    base, ids, work, args.llmcompressor_venv, args.llmcompressor_timeout)
            except PeerUnavailable as err:
                llmc.error = str(err)
        methods.append(llmc)
        diffs = {"quantdag_vs_plain_modelopt": scale_differences(quantdag_dir, plain_dir),
                 "quantdag_vs_plain_modelopt_bf16_calibration": scale_differences(quantdag_dir, plain_bf16_dir)}
        if llmc.error is None:
            diffs["quantdag_vs_llmcompressor"] = scale_differences(quantdag_dir, llmc.export_dir)
            diffs["plain_modelopt_bf16_calibration_vs_llmcompressor"] = scale_differences(plain_bf16_dir, llmc.export_dir)
        bf16 = evaluate_methods(base, profile.eval, methods)

    print(table(methods, bf16))
    for name, diff in diffs.items():
        print(f"\n{name}: {diff['modules']} modules; input_scale max abs diff {diff['input_scale']['max_abs']:.3e} "
              f"(max rel {diff['input_scale']['max_rel']:.3e}); weight_scale_2 max abs diff "
              f"{diff['weight_scale_2']['max_abs']:.3e} (max rel {diff['weight_scale_2']['max_rel']:.3e}); "
              f"equal bytes: weight {diff['weight_bytes_equal']:.4f}, weight_scale {diff['weight_scale_bytes_equal']:.4f}; "
              f"other tensors differing: {len(diff['other_tensors_differing'])}")
    result = {
        "profile": PROFILE,
        "calibration": {"rows": len(ids), "tokens": sum(int(x.numel()) for x in ids), "seq_len": profile.text.seq_len},
        "eval": {"path": profile.eval.path, **bf16},
        "methods": [asdict(m) | {"export_dir": None if m.export_dir is None else str(m.export_dir)} for m in methods],
        "scale_differences": diffs,
        "llmcompressor_job": job_report,
        "versions": {name: version(name) for name in ("torch", "transformers", "nvidia-modelopt")},
        "threads": torch.get_num_threads(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
