"""Recipes compared on real weights: SmolLM2-135M, the peer benchmark's data, one calibration for all.

Model and data are ``benchmarks/peer_smollm2.py``'s: SmolLM2-135M-Instruct (``conf/profiles/smollm2-nvfp4.yaml``,
the GGUF of ``quantdag fetch-smollm2`` dequantized to BF16), 15 real ``cnn_dailymail`` rows of
512 tokens for calibration, 16 WikiText-2 windows of 512 tokens for evaluation. Every recipe here
keeps the KV cache unquantized (``kv_cache: none``), the condition of the peer table's
llm-compressor row (its NVFP4 scheme has no KV quantization).

The pipeline's own plain step functions run in one process (no flow, no server): ``fetch_text`` -> ``calibrate`` (``calibration_recipe`` of every
recipe: one max calibration) -> ``merge_amax`` -> per recipe ``hessian`` (local_hessian) ->
``weight_scales`` -> ``export``, then every export is scored against one stored BF16 reference
(``bf16_reference``): the exported files read back by ``quantdag.format.reader`` and compared with
``quantdag.evaluation.logprobs``, as ``tasks/evaluate.py`` does, except that the weights are
dequantized once (:func:`score`) instead of per forward (the same outputs; the evaluate step's
packed layers cost a CPU about 25 s a window of this model, the dequantized ones a few). A recipe
row may name its own calibration rows (``seq_len``): those recipes share a second calibration.

``--device cuda`` runs the same steps on a GPU with ModelOpt's own CUDA/Triton kernels (BF16
compute); on the CPU, ModelOpt's NVFP4 kernels are replaced by ``quantdag.calibration.cpu_kernels``
and compute is float32. The peer rows (ModelOpt's plain script, llm-compressor) are the figures of
``benchmarks/peer_smollm2.py`` on the same data and reader (:data:`PEERS`); rerun that script to
measure them again.

Usage, from the repository root (reads ``../shared/data``; exits when it is absent)::

    nice -n 10 .venv/bin/python -m benchmarks.recipes_smollm2 --json /tmp/recipes_smollm2.json
    .venv/bin/python -m benchmarks.recipes_smollm2 --json out.json --device cuda --recipes nvfp4-max,nvfp4-local-hessian
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

PROFILE = "smollm2-nvfp4"

PEERS: dict[str, float] = {
    "plain ModelOpt script, NVFP4 W4A4 max (peer_smollm2.py)": 57.9,
    "llm-compressor NVFP4 W4A4 (peer_smollm2.py)": 57.2,
}
"""Perplexity increase over BF16 (%) of ``benchmarks/peer_smollm2.py``'s peer rows, KV unquantized,
same 15 calibration rows, 16 WikiText-2 windows and reader (CPU, float32). Their checkpoints hold
the same tensors as the ``nvfp4-max`` export (NVFP4 W4A4 linears, BF16 embeddings and norms)."""


@dataclass(frozen=True)
class Row:
    """One recipe measured: the recipe and the calibration rows' length it is calibrated on."""

    recipe: Any
    seq_len: int | None = None
    label: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or self.recipe.name


def recipes() -> list[Row]:
    """The measured recipes (KV cache unquantized in all)."""
    from conf.recipe import GroupFormats, RecipeSpec

    def recipe(name: str, **fields: Any) -> RecipeSpec:
        return RecipeSpec(name=name, kv_cache="none", **fields)

    fp8_attention = GroupFormats(attention="fp8", linear_attention="fp8")
    return [
        Row(recipe("nvfp4-max")),
        Row(recipe("nvfp4-mse", weight_scale="mse")),
        Row(recipe("nvfp4-local-hessian", weight_scale="local_hessian")),
        Row(recipe("nvfp4-local-hessian-2048", weight_scale="local_hessian"), seq_len=2048),
        Row(recipe("nvfp4-mlp-fp8-attention", formats=fp8_attention)),
        Row(recipe("nvfp4-mlp-fp8-attention-lh", formats=fp8_attention, weight_scale="local_hessian")),
        Row(recipe("nvfp4-w4a16", formats=GroupFormats(mlp="nvfp4_w4a16", attention="nvfp4_w4a16",
                                                        linear_attention="nvfp4_w4a16"))),
    ]


def measure(rows: list[Row], profile: Any, base: Any, store: Any, device: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Calibrate once per calibration length, then make, export and evaluate every recipe; (bf16, results)."""
    from quantdag.calibration.recipe import calibration_recipe, exports_calibration
    from tasks.calibrate import calibrate
    from tasks.export import export_checkpoint
    from tasks.fetch import fetch_text
    from tasks.hessian import collect_recipe_hessians
    from tasks.merge import merge_amax
    from tasks.reference import bf16_reference
    from tasks.weight_scales import recipe_state

    start = time.perf_counter()
    reference = bf16_reference(base, profile.eval, store, device)
    bf16 = {"reference_seconds": time.perf_counter() - start, "eval_windows": profile.eval.max_windows,
            "seq_len": profile.eval.seq_len}
    results = []
    for seq_len in dict.fromkeys(row.seq_len for row in rows):
        group = [row for row in rows if row.seq_len == seq_len]
        text = profile.text if seq_len is None else profile.text.model_copy(update={"seq_len": seq_len})
        start = time.perf_counter()
        fetched = fetch_text(text, store)
        shared = calibration_recipe([r.recipe for r in group])
        states = calibrate(base, {"text": fetched}, shared, {"text": text}, store, device)
        merged = merge_amax(states, store)
        calibration = {"seq_len": text.seq_len, "seconds": time.perf_counter() - start,
                       "tokens": states["text"].meta["tokens"]}
        print(f"calibration ({text.seq_len} tokens a row): {calibration['seconds']:.0f} s", file=sys.stderr, flush=True)
        for row in group:
            recipe, times = row.recipe, {}
            state = merged
            if not exports_calibration(recipe, shared):
                hessians = None
                if recipe.needs_hessian:
                    hessians = collect_recipe_hessians(base, {"text": fetched}, merged, recipe, {"text": text}, store, device)
                    times["hessian_seconds"] = hessians.meta["seconds"]
                state = recipe_state(base, merged, recipe, store, device, hessians=hessians)
                times["weight_scales_seconds"] = state.meta["seconds"]
            checkpoint = export_checkpoint(base, state, recipe, store, device)
            times["export_seconds"] = checkpoint.meta["seconds"]
            metrics = score(store, checkpoint, reference, device)
            results.append({"name": row.name, "recipe": json.loads(recipe.model_dump_json()), "calibration": calibration,
                            "checkpoint_sha256": checkpoint.sha256, **times, "metrics": metrics})
            print(f"{row.name}: perplexity {metrics['perplexity_nvfp4']:.3f} "
                  f"({100 * (metrics['perplexity_ratio'] - 1):+.2f}%), {sum(times.values()):.0f} s", file=sys.stderr, flush=True)
            bf16["perplexity"] = metrics["perplexity_bf16"]
    return bf16, results


def score(store: Any, checkpoint: Any, reference: Any, device: str) -> dict[str, float]:
    """The export's files against the stored BF16 reference: ``tasks/evaluate.py``'s metrics, weights dequantized once.

    Returns:
        ``quantdag.evaluation.logprobs.summarise``'s metrics, ``checkpoint_bytes`` (safetensors),
        ``bits_per_parameter`` (of the base's parameters), ``eval_seconds``.
    """
    import torch
    from safetensors.torch import load_file

    from quantdag.evaluation.logprobs import RECORD_KEYS, REFERENCE_FILE, add, compare_to_reference, summarise
    from quantdag.format.reader import load_nvfp4_model
    from quantdag.model import warm
    from quantdag.runtime import devices

    start = time.perf_counter()
    warm.release()
    torch_device = devices.pick_device(device)
    tensors = load_file(str(store.local_dir(reference) / REFERENCE_FILE))
    model = load_nvfp4_model(store.local_dir(checkpoint), dtype=warm.compute_dtype(torch_device), device=torch_device).model
    totals: dict[str, float] = {}
    with torch.no_grad():
        for index in range(tensors["text.ids"].shape[0]):
            ids = tensors["text.ids"][index][None].to(torch_device)
            record = {key: tensors[f"text.{key}"][index] for key in RECORD_KEYS}
            totals = add(totals, compare_to_reference(record, model(input_ids=ids, use_cache=False).logits, ids))
    stored = float(checkpoint.meta["safetensors_bytes"])
    return {**summarise(totals), "checkpoint_bytes": stored, "eval_seconds": time.perf_counter() - start,
            "bits_per_parameter": 8.0 * stored / reference.meta["parameters"]}


def table(bf16: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The markdown table: every recipe (``quantdag.evaluation.comparison``), then the peer rows."""
    from conf.recipe import RecipeSpec
    from quantdag.evaluation.comparison import recipe_row, table_markdown

    rows = []
    for result in results:
        seconds = sum(v for k, v in result.items() if k.endswith("_seconds"))
        row = recipe_row(RecipeSpec.model_validate(result["recipe"]), result["metrics"], seconds)
        row["recipe"] = f"{result['name']} (calibration rows of {result['calibration']['seq_len']} tokens)"
        rows.append(row)
    lines = table_markdown(rows, bf16.get("perplexity")).rstrip("\n").splitlines()
    lines += [f"| {name} | nvfp4/nvfp4/nvfp4 | max | - | {delta:+.1f}% | - | - | as nvfp4-max | - | - |"
              for name, delta in PEERS.items()]
    return "\n".join(lines)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results as JSON")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the steps run (default cpu)")
    parser.add_argument("--recipes", help="comma-separated recipe names to run (default: all of recipes())")
    parser.add_argument("--work-dir", type=Path, help="keep the artifacts here (default: a temporary directory)")
    return parser.parse_args()


def main() -> None:
    """Measure the recipes, print the table, write the JSON."""
    args = _parse_args()
    from benchmarks.peer_smollm2 import _load_inputs
    from quantdag.runtime.store import ArtifactStore

    rows = recipes()
    if args.recipes:
        wanted = args.recipes.split(",")
        unknown = sorted(set(wanted) - {row.name for row in rows})
        if unknown:
            sys.exit(f"recipes_smollm2: unknown recipes {unknown}; known: {[row.name for row in rows]}")
        rows = [row for row in rows if row.name in wanted]
    profile, base = _load_inputs(None)
    with tempfile.TemporaryDirectory(prefix="recipes-smollm2-") as tmp:
        work = args.work_dir or Path(tmp)
        store = ArtifactStore(str(work / "artifacts"))
        bf16, results = measure(rows, profile, base, store, args.device)
    print(table(bf16, results))
    import torch

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "profile": PROFILE, "device": args.device, "bf16": bf16, "results": results, "peers": PEERS,
        "versions": {name: version(name) for name in ("torch", "transformers", "nvidia-modelopt")},
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}, indent=1, default=str))


if __name__ == "__main__":
    main()
