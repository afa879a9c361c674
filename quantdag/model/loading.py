"""Resolve and load the BF16 base checkpoint (Hub repo, local directory or GGUF file).

A base is resolved once per flow run into a :class:`BaseRef`: a local directory plus an
immutable identity (the Hub commit sha, or a fingerprint of the local files). Tasks key their
caches on that identity, so a new Hub revision or a changed local file invalidates every step,
and an unchanged one reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from conf.schema import BaseModelSpec
from quantdag.format.scan import describe_nonfinite, find_nonfinite_weights

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*", "*.py"]


class BaseRef(BaseModel):
    """Identity and location of a resolved base checkpoint.

    Attributes:
        source_dir: local directory with ``config.json`` (and safetensors or the GGUF file).
        repo_id: Hub repo id, or None for a local base.
        revision: the revision asked for (branch, tag or sha).
        revision_sha: the Hub commit sha actually loaded, or None for a local base.
        fingerprint: sha256 over file names, sizes and mtimes (local) or the commit sha (Hub).
        gguf_file: GGUF file name inside ``source_dir``, if any.
        is_vlm: True when ``config.json`` has a ``vision_config`` (image-text calibration applies).
        model_type: ``config.json`` ``model_type`` (``qwen3_5``, ``llama``; GGUF: the GGUF arch).
    """

    model_config = ConfigDict(frozen=True)

    source_dir: str
    repo_id: str | None
    revision: str
    revision_sha: str | None
    fingerprint: str
    gguf_file: str | None = None
    is_vlm: bool
    model_type: str


def _fingerprint(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(directory)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolve_base(spec: BaseModelSpec) -> BaseRef:
    """Find the base checkpoint and pin its identity; downloads from the Hub when needed.

    Hub bases are resolved to a commit sha first (``HfApi.model_info``), then downloaded at that
    sha, so the files loaded are exactly that commit even if the branch moves meanwhile.

    Raises:
        ValueError: the local directory or GGUF file does not exist, or holds no ``config.json``
            and no GGUF file.
    """
    if spec.repo_id is not None:
        from huggingface_hub import HfApi, snapshot_download

        sha = HfApi().model_info(spec.repo_id, revision=spec.revision).sha
        directory = Path(snapshot_download(spec.repo_id, revision=sha, allow_patterns=_WEIGHT_PATTERNS))
        return _ref(spec, directory, revision_sha=sha, fingerprint=f"hub:{spec.repo_id}@{sha}")
    directory = Path(spec.local_dir).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"base.local_dir {directory} does not exist; build or download the model first")
    if spec.gguf_file and not (directory / spec.gguf_file).is_file():
        raise ValueError(f"base.gguf_file {spec.gguf_file!r} not found in {directory}")
    if not spec.gguf_file and not (directory / "config.json").is_file():
        raise ValueError(f"base.local_dir {directory} has no config.json (for a GGUF file set base.gguf_file)")
    return _ref(spec, directory, revision_sha=None, fingerprint=_fingerprint(directory))


def _ref(spec: BaseModelSpec, directory: Path, revision_sha: str | None, fingerprint: str) -> BaseRef:
    if spec.gguf_file:
        is_vlm, model_type = False, "gguf"
    else:
        config = json.loads((directory / "config.json").read_text())
        is_vlm, model_type = "vision_config" in config, config.get("model_type", "unknown")
    return BaseRef(
        source_dir=str(directory),
        repo_id=spec.repo_id,
        revision=spec.revision,
        revision_sha=revision_sha,
        fingerprint=fingerprint,
        gguf_file=spec.gguf_file,
        is_vlm=is_vlm,
        model_type=model_type,
    )


@dataclass
class LoadedModel:
    """A model in memory with how long it took to load (seconds)."""

    model: torch.nn.Module
    load_seconds: float


_loads = 0


def count_model_load() -> None:
    """Record that a whole model was read from files in this process (a base, or an export read back)."""
    global _loads
    _loads += 1


def model_loads() -> int:
    """Whole models read from files by this process so far (see :func:`count_model_load`)."""
    return _loads


def load_model(base: BaseRef, device: torch.device, dtype: torch.dtype = torch.bfloat16, placement: Any = None,
               offload_dir: str | Path | None = None) -> LoadedModel:
    """Load the base as a transformers model in ``dtype`` on ``device`` (eval mode).

    VLM bases (``vision_config`` present) load with ``AutoModelForImageTextToText``, others with
    ``AutoModelForCausalLM``. GGUF files are dequantized by transformers (needs PyPI ``gguf``)
    and get ``config.architectures`` filled in, which ModelOpt's export requires.

    Args:
        base: the resolved base.
        device: where the model runs (the whole model goes there unless ``placement`` spreads it).
        dtype: dtype of the weights (BF16 checkpoints upcast exactly to float32).
        placement: a :class:`quantdag.model.placement.Placement`; a spread one loads with its
            ``device_map`` (accelerate hooks move the layers kept in host RAM or on disk to the
            execution device for their forward).
        offload_dir: directory for weights placed on ``disk`` (a temporary directory when None).

    Raises:
        ValueError: a GGUF base's dequantized weights hold NaN or inf (names the parameters).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    start = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if placement is not None:
        kwargs |= placement.load_kwargs()
        if "disk" in kwargs.get("device_map", {}).values():
            kwargs["offload_folder"] = str(offload_dir or tempfile.mkdtemp(prefix="quantdag-offload-"))
    elif device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    loader = AutoModelForImageTextToText if base.is_vlm else AutoModelForCausalLM
    if base.gguf_file:
        kwargs["gguf_file"] = base.gguf_file
    model = loader.from_pretrained(base.source_dir, **kwargs)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if base.gguf_file:  # no safetensors to scan before the load: name NaN/inf weights before calibration
        bad = find_nonfinite_weights(model)
        if bad:
            raise ValueError(describe_nonfinite(f"base {base.source_dir}/{base.gguf_file}", bad,
                                                sum(p.is_floating_point() for p in model.parameters())))
    model.eval()
    if "device_map" not in kwargs:
        model.to(device)
    count_model_load()
    return LoadedModel(model=model, load_seconds=time.perf_counter() - start)


def text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the language model alone on ``input_ids`` (no vision, no lm_head).

    ``Qwen3_5ForConditionalGeneration`` -> ``model.model.language_model``; a causal LM ->
    ``model.model``.

    Raises:
        TypeError: the model has neither layout.
    """
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    if inner is not None and hasattr(inner, "layers"):
        return inner
    raise TypeError(f"{type(model).__name__}: cannot find its text decoder (model.language_model or model.model)")


def load_tokenizer(base: BaseRef) -> Any:
    """``AutoTokenizer`` of the base (from its directory, or from the GGUF file)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": base.gguf_file} if base.gguf_file else {}
    return AutoTokenizer.from_pretrained(base.source_dir, **kwargs)


def load_processor(base: BaseRef) -> Any:
    """``AutoProcessor`` of a VLM base (image processor + tokenizer + chat template).

    Raises:
        ValueError: the base is not a VLM.
    """
    from transformers import AutoProcessor

    if not base.is_vlm:
        raise ValueError(f"base {base.source_dir} has no vision_config: no processor to load")
    return AutoProcessor.from_pretrained(base.source_dir)
