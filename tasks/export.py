"""Export step: BF16 base + merged quantizer state -> a deployable NVFP4 checkpoint.

The calibrated model (kept in memory by calibration, or a fresh BF16 load that gets the
quantizers back with ``restore_from_modelopt_state``) gets the merged amax; ModelOpt's unified HF
export (``export_hf_checkpoint``) then writes packed E2M1 weights (``uint8 [out, in/2]``), E4M3
block scales (``weight_scale``, ``[out, in/16]``), FP32 ``weight_scale_2`` and ``input_scale``,
``hf_quant_config.json`` and ``config.json`` ``quantization_config``. transformers does not load the multi-token-prediction head (``mtp.*``),
so those tensors are read from the base's safetensors and written unchanged through
``extra_state_dict``, and ``mtp.*`` is added to ``exclude_modules``. Tokenizer, processor, chat
template and generation config are copied from the base.

A recipe with several formats (``conf.recipe``: e.g. NVFP4 MLP, FP8 attention) exports as
``quant_algo`` ``MIXED_PRECISION`` with each layer's format under ``quantized_layers``; ModelOpt
0.47 then writes no ``exclude_modules`` at all (its ``process_layer_quant_config`` drops them),
so :func:`declare_unquantized` adds them, summarised the way ModelOpt summarises a single-format
export, to ``hf_quant_config.json`` and ``config.json`` (``ignore``). Single-format exports are
left as ModelOpt wrote them.

Export mutates the in-memory model (weights become packed uint8): the model is dropped after it.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
from pathlib import Path

import torch

from conf.schema import PlacementSpec, RecipeSpec
from quantdag.format.checkpoint import Checkpoint
from quantdag.calibration.quantizer_state import STATE_FILE, apply_state, load_amax, load_state
from quantdag.model import loading as modeling
from quantdag.model import warm
from quantdag.model.loading import BaseRef
from quantdag.model.placement import placement_record
from quantdag.runtime import devices
from quantdag.runtime.measure import step_meter
from quantdag.runtime.progress import Progress
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.prefect_task import quantdag_task

CHECKPOINT_KIND = "checkpoint"
MIXED = "MIXED_PRECISION"
MTP_PREFIX = "mtp."
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


def read_mtp_tensors(source_dir: Path) -> dict[str, torch.Tensor]:
    """Every ``mtp.*`` tensor of the base checkpoint, unchanged (dtype and bytes as stored).

    Args:
        source_dir: the base's directory (``model.safetensors`` or an index and its shards).

    Returns:
        Tensor name -> tensor, ordered by shard file, then by name; empty when the base has none.

    Raises:
        CheckpointFileError: a safetensors file or the index is missing or malformed.
    """
    checkpoint = Checkpoint(source_dir)
    return dict(checkpoint.read(name for name in checkpoint.tensors if name.startswith(MTP_PREFIX)))


def copy_side_files(base: BaseRef, export_dir: Path) -> list[str]:
    """Copy tokenizer, processor, chat template and generation config files; returns their names.

    For a GGUF base the tokenizer is converted by transformers and saved with ``save_pretrained``.
    """
    source = Path(base.source_dir)
    copied = []
    if base.gguf_file:
        modeling.load_tokenizer(base).save_pretrained(export_dir)
        return sorted(p.name for p in export_dir.glob("*token*"))
    for name in _SIDE_FILES:
        if (source / name).is_file() and not (name == "generation_config.json" and (export_dir / name).exists()):
            shutil.copy2(source / name, export_dir / name)
            copied.append(name)
    return copied


def export_checkpoint(base: BaseRef, state_ref: ArtifactRef, recipe: RecipeSpec, store: ArtifactStore,
                      device: str = "auto", placement: PlacementSpec = PlacementSpec()) -> ArtifactRef:
    """Export the NVFP4 checkpoint and store it.

    The model is the one calibration left in this process (:mod:`quantdag.model.warm`) when there
    is one: the run then loads the base once for calibration and export. Otherwise (calibration
    was a cache hit or ran in another process) the base is loaded, placed within the memory
    budget, and the quantizers restored. An offloaded model is exported by ModelOpt's streaming
    path, one layer at a time.

    The checkpoint is written into ``store.scratch_dir()`` and stored with ``put_dir(move=True)``:
    on a local store its files (8-60 GB for large bases) are renamed into the store, not copied,
    so storing costs one hashing pass and no second copy on disk.

    Args:
        base: the resolved BF16 base.
        state_ref: the merged quantizer state (from ``merge_amax``).
        recipe: the recipe (its ``kv_cache`` setting is recorded in ``meta``).
        store: destination artifact store.
        device: where the export math runs (``auto``: CUDA when available).
        placement: the profile's placement (memory budget per device).

    Returns:
        A ``checkpoint`` artifact; ``meta`` has ``bytes``, ``mtp_tensors``, ``seconds``,
        ``model_loads``, ``peak_gpu_bytes``, ``peak_rss_bytes``, the placement, ``quant_algo``,
        ``kv_cache_quant_algo``, ``exclude_modules`` and the base identity.

    Raises:
        RuntimeError: ModelOpt wrote no ``hf_quant_config.json`` (nothing was quantized).
        ValueError: the state does not fit the base (see ``apply_state``).
    """
    from modelopt.torch.export import export_hf_checkpoint

    start = time.perf_counter()
    with step_meter() as meter, Progress("export", 4, key="export") as bar:
        state = load_state(store.local_dir(state_ref) / STATE_FILE)
        model, held = _quantized_model(base, state, recipe, devices.pick_device(device), placement)
        load_seconds, loaded, where = held.load_seconds, held.loaded, placement_record(held.placement)
        del held
        bar.update()
        mtp = read_mtp_tensors(Path(base.source_dir)) if not base.gguf_file else {}
        if mtp:
            model._mtp_layer_prefixes = [MTP_PREFIX]  # ModelOpt adds "mtp.*" to exclude_modules
        bar.update()
        with store.scratch_dir() as out:  # on the store's filesystem: put_dir(move=True) renames, no copy
            with torch.no_grad():
                export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out, extra_state_dict=mtp or None)
            del model  # packed in place by the export: never kept for another step
            bar.update()
            quant_file = out / "hf_quant_config.json"
            if not quant_file.is_file():
                raise RuntimeError("export wrote no hf_quant_config.json: no quantizer was enabled in the state")
            quant = json.loads(quant_file.read_text())["quantization"]
            if quant.get("quant_algo") == MIXED:
                quant = declare_unquantized(out)
            side = copy_side_files(base, out)
            bar.update()
            meta = {
                "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
                "safetensors_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                "mtp_tensors": len(mtp),
                "side_files": side,
                "seconds": time.perf_counter() - start,
                "load_seconds": load_seconds,
                "model_loads": 1.0 if loaded else 0.0,
                **{key: value for key, value in meter.record().items() if key != "model_loads"},
                **where,
                "quant_algo": quant.get("quant_algo"),
                "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
                "group_size": quant.get("group_size"),
                "exclude_modules": quant.get("exclude_modules", []),
                "kv_cache": recipe.kv_cache,
                "recipe": recipe.name,
                "recipe_spec": recipe.model_dump(mode="json"),
                "base_repo": base.repo_id,
                "base_revision_sha": base.revision_sha,
                "base_fingerprint": base.fingerprint,
            }
            return store.put_dir(out, CHECKPOINT_KIND, meta, move=True)


def declare_unquantized(export_dir: Path) -> dict:
    """Write ``exclude_modules`` into a ``MIXED_PRECISION`` export; returns the new ``quantization`` section.

    The unquantized modules are those with a weight of two or more dimensions (linears,
    embeddings, convolutions) that ``quantized_layers`` does not list; they are summarised into
    prefix wildcards with ModelOpt's own rule (``_prefix_wildcard_summarize_exclude_modules``, never
    matching a quantized layer) apart from those the export already lists (``mtp.*``), and written
    to ``hf_quant_config.json`` ``exclude_modules`` and ``config.json`` ``quantization_config.ignore``.

    Raises:
        CheckpointFileError: a file of the export is missing or malformed.
    """
    from modelopt.torch.export.quant_utils import _prefix_wildcard_summarize_exclude_modules

    checkpoint = Checkpoint(export_dir)
    config_file, quant_file = export_dir / "config.json", export_dir / "hf_quant_config.json"
    quant_config = json.loads(quant_file.read_text())
    section = quant_config["quantization"]
    quantized = set(section.get("quantized_layers") or {})
    listed = set(section.get("exclude_modules") or [])
    unquantized = sorted(module for module, params in checkpoint.modules.items()
                         if module not in quantized and "weight" in params and len(params["weight"].shape) >= 2
                         and not any(fnmatch.fnmatchcase(module, pattern) for pattern in listed))
    section["exclude_modules"] = sorted(listed | _prefix_wildcard_summarize_exclude_modules(unquantized, quantized))
    quant_file.write_text(json.dumps(quant_config, indent=4))
    config = json.loads(config_file.read_text())
    config["quantization_config"]["ignore"] = list(section["exclude_modules"])
    config_file.write_text(json.dumps(config, indent=4))
    return section


def _quantized_model(base: BaseRef, state: dict, recipe: RecipeSpec, device: torch.device,
                     placement: PlacementSpec) -> tuple[torch.nn.Module, warm.BaseModel]:
    """The base with the state's quantizers and amax, in BF16 weights, ready for ModelOpt's export.

    The model calibration kept in this process (same base, placement and recipe) only gets the
    merged amax; a kept BF16 model or a fresh load gets the quantizers restored
    (``apply_state``). Weights computed in float32 on the CPU go back to BF16 (exact: they were
    loaded from BF16), so the exported bytes do not depend on where the model came from.
    """
    held = warm.base_model(base, device, placement)
    if held.stage == "quantized" and held.note.get("recipe") == recipe.model_dump_json():
        model = load_amax(held.model, state)
    else:
        if held.stage == "quantized":  # quantizers of another recipe: start from the files
            del held
            held = warm.base_model(base, device, placement)
        model = apply_state(held.model, state)
    if any(param.dtype == torch.float32 for param in model.parameters()):
        _back_to_bf16(model)
    return model, held


def _back_to_bf16(model: torch.nn.Module) -> None:
    """Weights upcast for CPU compute go back to BF16, and the config says so again (``config.json``)."""
    for param in model.parameters():
        if param.dtype == torch.float32 and param.device.type != "meta":
            param.data = param.data.to(torch.bfloat16)
    config = model.config
    for sub in [config, *(getattr(config, name, None) for name in getattr(config, "sub_configs", {}))]:
        if sub is not None and getattr(sub, "dtype", None) in (torch.float32, "float32"):
            sub.dtype = torch.bfloat16


@quantdag_task("export", model_step=True)
def export_task(base: BaseRef, state: ArtifactRef, recipe: RecipeSpec, artifact_store: str, device: str,
                code_version: str, placement: PlacementSpec = PlacementSpec()) -> ArtifactRef:
    """Prefect wrapper of :func:`export_checkpoint` (``placement`` is not part of the cache key)."""
    return export_checkpoint(base, state, recipe, ArtifactStore(artifact_store), device, placement)
