"""Calibrate several branches on ONE model load, and calibrate faster with the same amax.

Shared load. Both calibration branches (``image_text``, ``text``) need the same BF16 base with
the same quantizers. When they run on the same GPU, :func:`calibrate_branches` loads the base
once and calibrates the branches one after the other, so the weights are read (54 GB for
Qwen3.6-27B) and held on the device once. Each branch still writes its own quantizer state,
equal to what :func:`tasks.calibrate.calibrate` writes for it in a process of its own:

- the first branch runs ``mtq.quantize`` (quantizer insertion + max calibration), as
  :func:`tasks.calibrate.calibrate` does;
- every later branch starts from a clean slate (:func:`reset_calibration`: each calibrated
  quantizer's ``_amax`` buffer is deleted, its max calibrator forgets its running max, and the
  input dtype the forward recorded is cleared) and runs ModelOpt's max-calibration entrypoint
  (the ``max_calibrate`` mode's ``convert``: what ``mtq.calibrate`` runs, without appending a
  second calibration mode to the model's ModelOpt state).

Fast statistics: the data loops run under :func:`quantdag.calibration.fast_max.fast_max_loop` (same amax as
ModelOpt's max calibration, fewer kernels, no host synchronisation).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from conf.schema import ImageTextSource, RecipeSpec, TextSource
from quantdag.model import loading as modeling
from quantdag.calibration.fast_max import fast_max_loop, fast_max_statistics  # noqa: F401 (re-exported)
from quantdag.model.loading import BaseRef
from quantdag.calibration.quantizer_state import amax_summary, collect_state, require_valid_inputs, save_state
from quantdag.calibration.recipe import build_quant_config
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from tasks.calibrate import CALIBRATORS, STATE_KIND, ForwardLoop, check_vision
from tasks.fetch import read_rows
from quantdag.runtime.prefect_task import quantdag_task

_VISION_STATS = ("image_tokens", "vision_forward_calls", "vision_embeddings")


# ----------------------------------------------------------------------------- shared branches
def reset_calibration(model: torch.nn.Module) -> int:
    """Put every quantizer back where ``mtq.quantize`` left it before calibrating; returns how many.

    Deletes ``_amax`` and the calibrator's running max of each quantizer that max calibration
    fills (enabled, with a calibrator, not a constant amax) and clears every quantizer's
    recorded input dtype, which a fresh model has as None until a forward sets it.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    count = 0
    for module in model.modules():
        if not isinstance(module, TensorQuantizer):
            continue
        module._input_dtype = None
        constant = module._use_constant_amax or module._constant_amax is not None
        if not module._disabled and not constant and module._calibrator is not None:
            module.reset_amax()
            count += 1
    return count


def recalibrate(model: torch.nn.Module, algorithm: Any, loop: ForwardLoop) -> torch.nn.Module:
    """Run ModelOpt's calibration entrypoint for ``algorithm`` on an already quantized model.

    The same ``convert`` that ``mtq.calibrate`` applies, without recording a second calibration
    mode in the model's ModelOpt state (so the state matches a model calibrated once).
    """
    from modelopt.torch.quantization.mode import CalibrateModeRegistry, get_modelike_from_algo_cfg

    ((mode_name, algo_cfg),) = get_modelike_from_algo_cfg(algorithm)
    descriptor = CalibrateModeRegistry[mode_name]
    model.eval()
    descriptor.convert(model, descriptor.config_class(**algo_cfg), forward_loop=loop)
    return model


def calibrate_branches(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                       sources: dict[str, ImageTextSource | TextSource], store: ArtifactStore,
                       device: str = "auto", fast: bool = True) -> dict[str, ArtifactRef]:
    """Calibrate every branch in ``rows`` on one load of the base; store one state per branch.

    Args:
        base: the resolved base checkpoint.
        rows: branch kind (``image_text``, ``text``) -> rows artifact of its fetch step, in the
            order the branches run.
        recipe: the quantization recipe.
        sources: branch kind -> its calibration source settings.
        store: where the states go.
        device: ``auto``, ``cpu`` or ``cuda``.
        fast: run the data loops under :func:`fast_max_statistics` (same amax, fewer kernels).

    Returns:
        Branch kind -> ``quantizer-state`` artifact, each as :func:`tasks.calibrate.calibrate`
        writes it; ``meta`` adds ``model_loads`` (1 for the branch that loaded the model, 0 for
        the others, whose ``load_seconds`` is 0) and ``shared_branches``.

    Raises:
        ValueError: no branch, an unknown kind, a kind without its source, or an enabled input
            quantizer without a usable amax (each module named).
        RuntimeError: the image-text branch did not run the vision tower.
    """
    unknown = sorted(set(rows) - set(CALIBRATORS))
    if not rows or unknown or set(sources) < set(rows):
        raise ValueError(f"calibrate_branches: branches {sorted(rows)} (unknown: {unknown}) need sources "
                         f"{sorted(rows)}, got {sorted(sources)}; kinds are {sorted(CALIBRATORS)}")
    torch_device = modeling.pick_device(device)
    stats: dict[str, dict[str, float]] = {}
    loops: dict[str, ForwardLoop] = {}
    for kind, ref in rows.items():
        rows_dir, kind_rows = read_rows(store, ref)
        stats[kind] = {"rows": 0, "tokens": 0, **dict.fromkeys(_VISION_STATS, 0)}
        loop = CALIBRATORS[kind](base, rows_dir, kind_rows, sources[kind], torch_device, stats[kind])
        loops[kind] = fast_max_loop(loop) if fast else loop
    loaded = modeling.load_model(base, torch_device)
    if torch_device.type == "cpu":
        loaded.model.float()  # as tasks.calibrate does: no fast BF16 matmul on CPUs (exact upcast)
    import modelopt.torch.quantization as mtq

    config, model, refs = build_quant_config(recipe), loaded.model, {}
    for index, (kind, loop) in enumerate(loops.items()):
        start = time.perf_counter()
        if index == 0:
            model = mtq.quantize(model, config, forward_loop=loop)
        else:
            reset_calibration(model)
            recalibrate(model, config["algorithm"], loop)
        seconds = time.perf_counter() - start
        if kind == "image_text":
            check_vision(stats[kind])
        state = collect_state(model)
        require_valid_inputs(state, where=f"calibrate_{kind}")
        refs[kind] = _store_state(state, kind, stats[kind], store, {
            "load_seconds": loaded.load_seconds if index == 0 else 0.0,
            "model_loads": 1.0 if index == 0 else 0.0,
            "shared_branches": float(len(loops)),
            "calibrate_seconds": seconds,
            "tokens_per_second": stats[kind]["tokens"] / seconds if seconds else 0.0,
        })
    del model, loaded  # the task wrapper (quantdag.runtime.prefect_task) then collects and empties the CUDA cache
    return refs


def _store_state(state: dict[str, Any], kind: str, stats: dict[str, float], store: ArtifactStore,
                 timing: dict[str, float]) -> ArtifactRef:
    metrics = {**stats, **timing, **amax_summary(state)}
    if kind != "image_text":
        for key in _VISION_STATS:
            metrics.pop(key)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_state(state, out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return store.put_dir(out, STATE_KIND, {"kind": kind, "shard": 0, "num_shards": 1, **metrics})


@quantdag_task("calibrate_branches")
def calibrate_branches_task(base: BaseRef, rows: dict[str, ArtifactRef], recipe: RecipeSpec,
                            sources: dict[str, ImageTextSource | TextSource], artifact_store: str, device: str,
                            code_version: str) -> dict[str, ArtifactRef]:
    """Prefect wrapper of :func:`calibrate_branches` (one model load for every branch)."""
    return calibrate_branches(base, rows, recipe, sources, ArtifactStore(artifact_store), device)
