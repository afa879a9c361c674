"""The exported FILES against ModelOpt's in-memory fake quantization, on the same input.

Two implementations of the same NVFP4 model, both in float32 on one device:

a. ``quantdag.reader.load_nvfp4_model``: the export's packed E2M1 weights and E4M3 block scales
   dequantized, activations fake-quantized per 16 elements against the exported
   ``input_scale``, K/V cast to FP8 E4M3 ("fp8_cast");
b. ModelOpt's fake-quant model: the BF16 base upcast to float32, the calibration state restored
   (``quantdag.quantizer_state.apply_state``), then the same amax unification that
   ``export_hf_checkpoint`` performs before it writes (``requantize_resmooth_fused_llm_layers``:
   layers that read one input, q/k/v and gate/up, get the max of their input amax, fused
   siblings one weight amax). Without that step the in-memory model is not the file (DESIGN.md:
   21% apart on a 4-layer model).

Printed and written: ``||a - b|| / ||b||`` of the logits (target < 1e-3), each side against the
unquantized float32 base, top-1 agreement, and how far b's unified scales are from the file's
(``input_scale`` vs ``amax / (6 * 448)``; ``weight_scale_2`` likewise).

    python -m benchmarks.file_vs_fakequant --base MODEL_DIR --json out.json
        quantizes MODEL_DIR itself (max calibration on --calib-rows windows of --text) and exports;
    python -m benchmarks.file_vs_fakequant --base MODEL_DIR --export EXPORT_DIR --state STATE.pt
        compares an existing export with the state it was exported from (a flow run's merged state).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SCALE = 6.0 * 448.0  # NVFP4 per-tensor scale = amax / (E2M1 max * E4M3 max)


def token_ids(base_dir: Path, text: Path | None, tokens: int, rows: int, seed: int = 0) -> torch.Tensor:
    """``int64 [rows, tokens]``: windows of ``text`` tokenized by the base's tokenizer, or seeded random ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if text is not None:
        ids = tokenizer(text.read_text()[: rows * tokens * 12], return_tensors="pt")["input_ids"][0]
        if ids.numel() >= rows * tokens:
            return ids[: rows * tokens].view(rows, tokens)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer) - 64, (rows, tokens), generator=generator)


def quantize_and_export(base_dir: Path, ids: torch.Tensor, out: Path, device: torch.device) -> tuple[Path, Path]:
    """Max-calibrate the base on ``ids`` (one row a batch), save the state, export; returns (export, state)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from conf.schema import BaseModelSpec, RecipeSpec
    from quantdag.modeling import load_model, resolve_base, text_decoder
    from quantdag.quantizer_state import collect_state, save_state
    from quantdag.recipe import build_quant_config

    model = load_model(resolve_base(BaseModelSpec(local_dir=str(base_dir))), device).model
    if device.type == "cpu":
        model.float()

    def loop(calibrated: torch.nn.Module) -> None:
        decoder = text_decoder(calibrated)
        with torch.no_grad():
            for row in ids:
                decoder(input_ids=row[None].to(device), use_cache=False)

    model = mtq.quantize(model, build_quant_config(RecipeSpec()), forward_loop=loop)
    state_path = save_state(collect_state(model), out / "state")
    with torch.no_grad():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out / "export")
    return out / "export", state_path


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=row[None], use_cache=False).logits.float() for row in ids])


def _scale_gaps(model: torch.nn.Module, export_dir: Path) -> dict[str, float]:
    """Largest relative gap between the unified in-memory scales and the exported ones."""
    from safetensors import safe_open

    scales: dict[str, torch.Tensor] = {}
    for file in export_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            scales.update({k: handle.get_tensor(k) for k in handle.keys() if k.endswith(("input_scale", "weight_scale_2"))})
    gaps = {"input_scale": 0.0, "weight_scale_2": 0.0, "compared": 0.0}
    for name, module in model.named_modules():
        for suffix, quantizer in (("input_scale", "input_quantizer"), ("weight_scale_2", "weight_quantizer")):
            exported = scales.get(f"{name}.{suffix}")
            amax = getattr(getattr(module, quantizer, None), "amax", None)
            if exported is None or amax is None:
                continue
            ours = amax.float().cpu().reshape(()) / SCALE
            gap = float((ours - exported.float().reshape(())).abs() / exported.float().abs())
            gaps[suffix] = max(gaps[suffix], gap)
            gaps["compared"] += 1
    return gaps


def unified_fakequant_model(base_dir: Path, state_path: Path, device: torch.device) -> torch.nn.Module:
    """The float32 base with the state restored and amax unified as ``export_hf_checkpoint`` unifies them."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    from conf.schema import BaseModelSpec
    from quantdag.modeling import load_model, resolve_base
    from quantdag.quantizer_state import apply_state, load_state

    model = load_model(resolve_base(BaseModelSpec(local_dir=str(base_dir))), device, dtype=torch.float32).model
    model = apply_state(model, load_state(state_path))
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


def compare(base_dir: Path, export_dir: Path, state_path: Path, ids: torch.Tensor,
            device: torch.device) -> dict[str, Any]:
    """Logits of the file (a) and of ModelOpt's unified fake-quant model (b); see the module docstring.

    Raises:
        RuntimeError: ``device`` is not CUDA (ModelOpt's NVFP4 fake quantization needs it).
    """
    import modelopt.torch.quantization as mtq

    from quantdag.reader import load_nvfp4_model

    if device.type != "cuda":
        raise RuntimeError("ModelOpt's NVFP4 fake quantization runs on CUDA only; use --scales-only on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = ids.to(device)
    start = time.perf_counter()
    loaded = load_nvfp4_model(export_dir, dtype=torch.float32)
    file_model = loaded.model.to(device).eval()
    logits_a = _logits(file_model, ids)
    del file_model, loaded
    seconds_a = time.perf_counter() - start

    start = time.perf_counter()
    model = unified_fakequant_model(base_dir, state_path, device)
    gaps = _scale_gaps(model, export_dir)
    logits_b = _logits(model, ids)
    mtq.disable_quantizer(model, "*")
    logits_ref = _logits(model, ids)
    seconds_b = time.perf_counter() - start

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    return {
        "rel_file_vs_fakequant": rel(logits_a, logits_b),
        "rel_file_vs_float32_base": rel(logits_a, logits_ref),
        "rel_fakequant_vs_float32_base": rel(logits_b, logits_ref),
        "max_abs_file_vs_fakequant": float((logits_a - logits_b).abs().max()),
        "top1_agreement": float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean()),
        "tokens": float(ids.numel()),
        "scale_gap_input": gaps["input_scale"],
        "scale_gap_weight": gaps["weight_scale_2"],
        "scales_compared": gaps["compared"],
        "seconds_file": seconds_a,
        "seconds_fakequant": seconds_b,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="BF16 checkpoint directory")
    parser.add_argument("--export", type=Path, help="NVFP4 export of --base (default: quantize and export here)")
    parser.add_argument("--state", type=Path, help="quantizer_state.pt the export was made from")
    parser.add_argument("--text", type=Path, help="text to tokenize (default: random token ids)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens a row")
    parser.add_argument("--rows", type=int, default=2, help="rows compared")
    parser.add_argument("--calib-rows", type=int, default=4, help="rows calibrated on when quantizing here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--label", default="", help="name of this comparison in the output")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--scales-only", action="store_true",
                        help="only compare the unified in-memory scales with the file's (runs on a CPU)")
    args = parser.parse_args(argv)
    if (args.export is None) != (args.state is None):
        parser.error("give both --export and --state, or neither")
    device = torch.device(args.device)
    ids = token_ids(args.base, args.text, args.tokens, args.rows + args.calib_rows)
    with tempfile.TemporaryDirectory() as tmp:
        export_dir, state = args.export, args.state
        if export_dir is None:
            export_dir, state = quantize_and_export(args.base, ids[args.rows:], Path(tmp), device)
        if args.scales_only:
            gaps = _scale_gaps(unified_fakequant_model(args.base, state, device), export_dir)
            print(json.dumps(gaps, indent=1))
            return gaps
        result = {"label": args.label, "base": str(args.base), **compare(args.base, export_dir, state, ids[: args.rows], device)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    verdict = "meets" if result["rel_file_vs_fakequant"] < 1e-3 else "MISSES"
    print(f"{args.label or args.base}: ||file - fakequant|| / ||fakequant|| = {result['rel_file_vs_fakequant']:.3e} "
          f"({verdict} the 1e-3 target)")
    return result


if __name__ == "__main__":
    main()
