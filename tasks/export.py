"""Export step: BF16 base + merged quantizer state -> a deployable NVFP4 checkpoint.

A freshly loaded BF16 base gets the quantizers back (``restore_from_modelopt_state``) and the
merged amax; ModelOpt's unified HF export (``export_hf_checkpoint``) then writes packed E2M1
weights (``uint8 [out, in/2]``), E4M3 block scales (``weight_scale``, ``[out, in/16]``), FP32
``weight_scale_2`` and ``input_scale``, ``hf_quant_config.json`` and ``config.json``
``quantization_config``. transformers does not load the multi-token-prediction head (``mtp.*``),
so those tensors are read from the base's safetensors and written unchanged through
``extra_state_dict``, and ``mtp.*`` is added to ``exclude_modules``. Tokenizer, processor, chat
template and generation config are copied from the base.

Export mutates the in-memory model (weights become packed uint8): the model is dropped after it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from conf.schema import RecipeSpec
from quantdag.format.checkpoint import Checkpoint
from quantdag.model import loading as modeling
from quantdag.runtime import devices
from quantdag.model.loading import BaseRef
from quantdag.runtime.progress import Progress
from quantdag.calibration.quantizer_state import STATE_FILE, apply_state, load_state
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.prefect_task import quantdag_task

CHECKPOINT_KIND = "checkpoint"
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
                      device: str = "auto") -> ArtifactRef:
    """Export the NVFP4 checkpoint and store it.

    The checkpoint is written into ``store.scratch_dir()`` and stored with ``put_dir(move=True)``:
    on a local store its files (8-60 GB for large bases) are renamed into the store, not copied,
    so storing costs one hashing pass and no second copy on disk.

    Args:
        base: the resolved BF16 base.
        state_ref: the merged quantizer state (from ``merge_amax``).
        recipe: the recipe (its ``kv_cache`` setting is recorded in ``meta``).
        store: destination artifact store.
        device: where the export math runs (``auto``: CUDA when available).

    Returns:
        A ``checkpoint`` artifact; ``meta`` has ``bytes``, ``mtp_tensors``, ``seconds``,
        ``quant_algo``, ``kv_cache_quant_algo``, ``exclude_modules`` and the base identity.

    Raises:
        RuntimeError: ModelOpt wrote no ``hf_quant_config.json`` (nothing was quantized).
        ValueError: the state does not fit the base (see ``apply_state``).
    """
    from modelopt.torch.export import export_hf_checkpoint

    start = time.perf_counter()
    with Progress("export", 4, key="export") as bar:
        state = load_state(store.local_dir(state_ref) / STATE_FILE)
        loaded = modeling.load_model(base, devices.pick_device(device))
        load_seconds = loaded.load_seconds
        bar.update()
        model = apply_state(loaded.model, state)
        mtp = read_mtp_tensors(Path(base.source_dir)) if not base.gguf_file else {}
        if mtp:
            model._mtp_layer_prefixes = [MTP_PREFIX]  # ModelOpt adds "mtp.*" to exclude_modules
        bar.update()
        with store.scratch_dir() as out:  # on the store's filesystem: put_dir(move=True) renames, no copy
            with torch.no_grad():
                export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out, extra_state_dict=mtp or None)
            del model, loaded
            bar.update()
            quant_file = out / "hf_quant_config.json"
            if not quant_file.is_file():
                raise RuntimeError("export wrote no hf_quant_config.json: no quantizer was enabled in the state")
            quant = json.loads(quant_file.read_text())["quantization"]
            side = copy_side_files(base, out)
            bar.update()
            meta = {
                "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
                "safetensors_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                "mtp_tensors": len(mtp),
                "side_files": side,
                "seconds": time.perf_counter() - start,
                "load_seconds": load_seconds,
                "quant_algo": quant.get("quant_algo"),
                "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
                "group_size": quant.get("group_size"),
                "exclude_modules": quant.get("exclude_modules", []),
                "kv_cache": recipe.kv_cache,
                "base_repo": base.repo_id,
                "base_revision_sha": base.revision_sha,
                "base_fingerprint": base.fingerprint,
            }
            return store.put_dir(out, CHECKPOINT_KIND, meta, move=True)


@quantdag_task("export", model_step=True)
def export_task(base: BaseRef, state: ArtifactRef, recipe: RecipeSpec, artifact_store: str, device: str,
                code_version: str) -> ArtifactRef:
    """Prefect wrapper of :func:`export_checkpoint`."""
    return export_checkpoint(base, state, recipe, ArtifactStore(artifact_store), device)
