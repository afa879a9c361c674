"""The exported FILES against ModelOpt's in-memory fake quantization, on the same input.

Two implementations of the same NVFP4 model, both in float32 on one device:

a. ``quantdag.format.reader.load_nvfp4_model``: the export's packed E2M1 weights and E4M3 block scales
   dequantized, activations fake-quantized per 16 elements against the exported
   ``input_scale``, K/V cast to FP8 E4M3 ("fp8_cast");
b. ModelOpt's fake-quant model: the BF16 base upcast to float32, the calibration state restored
   (``quantdag.calibration.quantizer_state.apply_state``), then the same amax unification that
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
    from quantdag.model.loading import load_model, resolve_base, text_decoder
    from quantdag.calibration.quantizer_state import collect_state, save_state
    from quantdag.calibration.recipe import build_quant_config

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


def _hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """float32 hidden states after the embeddings and after each decoder layer, one row."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    return [h.float() for h in out.hidden_states]


def export_tensors(export_dir: Path, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The export's tensors whose names end with one of ``suffixes``, read through the project's
    checkpoint view (``quantdag.format.checkpoint``: the index or ``model.safetensors``)."""
    from quantdag.format.checkpoint import Checkpoint

    checkpoint = Checkpoint(export_dir)
    return dict(checkpoint.read(name for name in checkpoint.tensors if name.endswith(suffixes)))


def _scale_gaps(model: torch.nn.Module, export_dir: Path) -> dict[str, float]:
    """Largest relative gap between the unified in-memory scales and the exported ones."""
    scales = export_tensors(export_dir, ("input_scale", "weight_scale_2"))
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
    from quantdag.model.loading import load_model, resolve_base
    from quantdag.calibration.quantizer_state import apply_state, load_state

    model = load_model(resolve_base(BaseModelSpec(local_dir=str(base_dir))), device, dtype=torch.float32).model
    model = apply_state(model, load_state(state_path))
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


def export_path_weights(model: torch.nn.Module) -> int:
    """Give each NVFP4-quantized linear the weight ModelOpt's export writes, dequantized, in place.

    Per module: ``get_weight_scaling_factor`` / ``get_weight_scaling_factor_2`` (the E4M3 block
    scales and the FP32 ``weight_scale_2`` that ``export_hf_checkpoint`` stores), then
    ``NVFP4QTensor.quantize`` (the export's own E2M1 rounding, ties to even) and its
    ``dequantize``; the weight quantizer is then disabled, so the forward multiplies by exactly
    those weights while ModelOpt keeps fake-quantizing the activations. Returns the modules changed.
    """
    from modelopt.torch.export.quant_utils import get_weight_scaling_factor, get_weight_scaling_factor_2
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    changed = 0
    for module in _nvfp4_linears(model).values():
        weight = module.weight
        scale, scale_2 = get_weight_scaling_factor(module), get_weight_scaling_factor_2(module)
        packed, scale, scale_2 = NVFP4QTensor.quantize(weight.detach().float(), 16, scale, scale_2)
        dequantized = packed.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
        with torch.no_grad():
            weight.copy_(dequantized.reshape(weight.shape).to(weight.dtype))
        module.weight_quantizer.disable()
        changed += 1
    return changed


def _nvfp4_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules whose weight quantizer is enabled with 16-element blocks (NVFP4)."""
    found = {}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None and quantizer.is_enabled and (quantizer.block_sizes or {}).get(-1) == 16:
            found[name] = module
    return found


E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def weight_differences(file_weights: dict[str, torch.Tensor], model: torch.nn.Module, export_dir: Path) -> dict[str, Any]:
    """Elements where the file's dequantized weight differs from ``model``'s effective weight.

    ``model``'s effective weight is its weight quantizer's output when the quantizer is enabled
    (ModelOpt's fake quantization), else the weight itself. Each differing element is classed by
    where ``|W| / (float(weight_scale) * weight_scale_2)`` lies: on an E2M1 midpoint (a tie the two
    roundings break differently), within 1e-6 of one, or elsewhere.
    """
    scales = export_tensors(export_dir, ("weight_scale", "weight_scale_2"))
    totals = {"modules": 0, "modules_differing": 0, "elements": 0, "differing": 0, "ties": 0, "near_ties": 0, "other": 0}
    worst: list[tuple[int, str]] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if name not in file_weights or getattr(module, "weight_quantizer", None) is None:
                continue
            ours = module.weight_quantizer(module.weight) if module.weight_quantizer.is_enabled else module.weight
            theirs = file_weights[name].to(ours.device, ours.dtype)
            differ = ours != theirs
            count = int(differ.sum())
            totals["modules"] += 1
            totals["elements"] += ours.numel()
            if not count:
                continue
            totals["modules_differing"] += 1
            totals["differing"] += count
            worst.append((count, name))
            block, scale_2 = scales.get(f"{name}.weight_scale"), scales.get(f"{name}.weight_scale_2")
            if block is None or scale_2 is None:
                totals["other"] += count
                continue
            per_element = (block.float().to(ours.device).repeat_interleave(16, dim=-1) * scale_2.float().to(ours.device))
            scaled = (module.weight.float().abs() / per_element)[differ]
            midpoints = torch.tensor(E2M1_MIDPOINTS, device=scaled.device)
            distance = (scaled[:, None] - midpoints).abs().min(dim=1).values
            ties, near = int((distance == 0).sum()), int(((distance > 0) & (distance <= 1e-6 * scaled)).sum())
            totals["ties"] += ties
            totals["near_ties"] += near
            totals["other"] += count - ties - near
    totals["worst_modules"] = [f"{name}: {count}" for count, name in sorted(worst, reverse=True)[:5]]
    return totals


def compare(base_dir: Path, export_dir: Path, state_path: Path, ids: torch.Tensor,
            device: torch.device) -> dict[str, Any]:
    """Logits of the file against ModelOpt's in-memory model, with the diagnostics that explain a gap.

    a. the file through :func:`quantdag.format.reader.load_nvfp4_model` (float32);
    b. ModelOpt's unified fake-quant model (:func:`unified_fakequant_model`): weights through
       ModelOpt's weight fake quantization (its Triton kernel on CUDA), activations and K/V
       through its quantizers;
    c. the same ModelOpt model with the export path's weights (:func:`export_path_weights`):
       activations and K/V still through ModelOpt's quantizers;
    b2. b with every row in one batch instead of one row at a time: how far the same fake-quant
       model moves when only the kernels' reduction order changes (the noise floor of W4A4);
       b3. b run again on the same input (zero when every kernel is deterministic).
    Also the hidden states after each decoder layer, a vs c, on the first row: where they part.

    Raises:
        RuntimeError: ``device`` is not CUDA (ModelOpt's NVFP4 fake quantization needs it).
    """
    import modelopt.torch.quantization as mtq

    from quantdag.format.reader import load_nvfp4_model

    if device.type != "cuda":
        raise RuntimeError("ModelOpt's NVFP4 fake quantization runs on CUDA only; use --scales-only on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids = ids.to(device)
    start = time.perf_counter()
    loaded = load_nvfp4_model(export_dir, dtype=torch.float32, device=device)
    file_model = loaded.model.eval()
    logits_a = _logits(file_model, ids)
    hidden_a = _hidden_states(file_model, ids[:1])
    file_weights = {name: module.weight.detach() for name, module in file_model.named_modules()
                    if type(module).__name__ == "NVFP4Linear"}
    del file_model, loaded
    seconds_a = time.perf_counter() - start

    start = time.perf_counter()
    model = unified_fakequant_model(base_dir, state_path, device)
    gaps = _scale_gaps(model, export_dir)
    logits_b = _logits(model, ids)
    with torch.no_grad():
        logits_b_batched = model(input_ids=ids, use_cache=False).logits.float().reshape(logits_b.shape)
    logits_b_again = _logits(model, ids)
    weights_b = weight_differences(file_weights, model, export_dir)
    changed = export_path_weights(model)
    logits_c = _logits(model, ids)
    weights_c = weight_differences(file_weights, model, export_dir)
    hidden_c = _hidden_states(model, ids[:1])
    mtq.disable_quantizer(model, "*")
    logits_ref = _logits(model, ids)
    seconds_b = time.perf_counter() - start

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    return {
        "rel_file_vs_fakequant": rel(logits_a, logits_b),
        "rel_file_vs_modelopt_export_weights": rel(logits_a, logits_c),
        "rel_fakequant_batched_vs_rows": rel(logits_b_batched, logits_b),
        "rel_fakequant_run_twice": rel(logits_b_again, logits_b),
        "rel_hidden_file_vs_export_weights_per_layer": [rel(x, y) for x, y in zip(hidden_a, hidden_c)],
        "rel_file_vs_float32_base": rel(logits_a, logits_ref),
        "rel_fakequant_vs_float32_base": rel(logits_b, logits_ref),
        "max_abs_file_vs_fakequant": float((logits_a - logits_b).abs().max()),
        "max_abs_file_vs_modelopt_export_weights": float((logits_a - logits_c).abs().max()),
        "top1_agreement": float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean()),
        "top1_agreement_export_weights": float((logits_a.argmax(-1) == logits_c.argmax(-1)).float().mean()),
        "weights_file_vs_fakequant": weights_b,
        "weights_file_vs_export_path": weights_c,
        "modules_given_export_weights": changed,
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
    for key, what in (("rel_file_vs_fakequant", "ModelOpt fake quant"),
                      ("rel_file_vs_modelopt_export_weights", "ModelOpt, export-path weights")):
        verdict = "meets" if result[key] < 1e-3 else "MISSES"
        print(f"{args.label or args.base}: ||file - {what}|| / ||{what}|| = {result[key]:.3e} ({verdict} the 1e-3 target)")
    print(f"noise floor (same fake-quant model, batched vs row by row): {result['rel_fakequant_batched_vs_rows']:.3e}; "
          f"weights differing from the file: fake quant {result['weights_file_vs_fakequant']['differing']} "
          f"(ties {result['weights_file_vs_fakequant']['ties']}), export path {result['weights_file_vs_export_path']['differing']}")
    return result


if __name__ == "__main__":
    main()
