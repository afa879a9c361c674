"""One read-only view of a Hugging Face safetensors checkpoint directory, sharded or not.

Every reader of a checkpoint in the project goes through :class:`Checkpoint` (the NVFP4 reader,
the audit, the export step's ``mtp.*`` copy, the benchmarks):

- :attr:`Checkpoint.tensors`: every tensor's :class:`TensorInfo` (file, dtype tag, shape, bytes),
  from ``model.safetensors.index.json`` and the safetensors headers; no tensor data is read.
- :meth:`Checkpoint.read` and :meth:`Checkpoint.reader`: tensors by name, one at a time, from
  memory-mapped files, so reading a 27B checkpoint needs memory for one tensor, not the model.
- :meth:`Checkpoint.json` and :meth:`Checkpoint.quantization`: the JSON side files
  (``config.json``, ``hf_quant_config.json``, the index).

The tensors are those the index maps, else those of ``model.safetensors``, as transformers
resolves them. A missing, unreadable or malformed file raises :class:`CheckpointFileError`
naming it.
"""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANT_CONFIG_FILE = "hf_quant_config.json"
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library refuses larger headers too


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, unreadable or malformed.

    Attributes:
        path: the offending file: ``<label>:<name>`` (``export:config.json``) for a labelled
            checkpoint, else its full path.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's safetensors header entry.

    ``str(info)`` is the dtype tag and shape, ``F8_E4M3[64, 4]``.
    """

    file: str  # safetensors file name inside the checkpoint directory
    dtype: str  # safetensors dtype tag: U8, F8_E4M3, BF16, F32, ...
    shape: tuple[int, ...]
    nbytes: int

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


class Checkpoint:
    """Read-only view of a checkpoint directory; headers and JSON files are read once, on first use.

    Args:
        root: directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and its
            shards, and the JSON side files.
        label: names the checkpoint in errors (``export``, ``base``); None names files by path.
    """

    def __init__(self, root: str | os.PathLike[str], label: str | None = None) -> None:
        self.root = Path(root)
        self.label = label
        self._json: dict[str, dict[str, Any]] = {}

    def error(self, name: str, message: str) -> CheckpointFileError:
        """The error for file ``name`` of this checkpoint."""
        path = f"{self.label}:{name}" if self.label is not None else str(self.root / name)
        return CheckpointFileError(path, message)

    def json(self, name: str) -> dict[str, Any]:
        """The JSON object in file ``name``.

        Raises:
            CheckpointFileError: the file is missing, unreadable or not a JSON object.
        """
        if name not in self._json:
            try:
                data = json.loads((self.root / name).read_text())
            except FileNotFoundError as err:
                raise self.error(name, "file is missing") from err
            except (OSError, ValueError) as err:
                raise self.error(name, f"unreadable JSON ({err})") from err
            if not isinstance(data, dict):
                raise self.error(name, "is not a JSON object")
            self._json[name] = data
        return self._json[name]

    def quantization(self) -> dict[str, Any]:
        """The ``quantization`` object of ``hf_quant_config.json`` (``quant_algo``, ...).

        Raises:
            CheckpointFileError: the file is missing or malformed or has no such object.
        """
        section = self.json(QUANT_CONFIG_FILE).get("quantization")
        if not isinstance(section, dict):
            raise self.error(QUANT_CONFIG_FILE, "has no 'quantization' object")
        return section

    def _files(self) -> dict[str, list[str] | None]:
        """Safetensors file -> the tensor names the index maps there (None: every stored one)."""
        if not (self.root / INDEX_FILE).is_file():
            if not (self.root / SINGLE_FILE).is_file():
                raise self.error(SINGLE_FILE, f"neither {SINGLE_FILE} nor {INDEX_FILE} exists")
            return {SINGLE_FILE: None}
        weight_map = self.json(INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise self.error(INDEX_FILE, "has no weight_map")
        if not all(isinstance(file, str) for file in weight_map.values()):
            raise self.error(INDEX_FILE, "weight_map maps a tensor to a non-string file name")
        files: dict[str, list[str]] = defaultdict(list)
        for name, file in weight_map.items():
            files[file].append(name)
        return dict(files)

    def _header(self, file: str) -> dict[str, TensorInfo]:
        """Every tensor stored in ``file``, from its header alone."""
        try:
            with (self.root / file).open("rb") as handle:
                data_bytes = os.fstat(handle.fileno()).st_size - 8
                prefix = handle.read(8)
                length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
                if not 0 < length <= min(data_bytes, _MAX_HEADER_BYTES):
                    raise self.error(file, "not a safetensors file (bad header length)")
                header = json.loads(handle.read(length))
        except FileNotFoundError as err:
            raise self.error(file, "file is missing") from err
        except OSError as err:
            raise self.error(file, f"unreadable ({err})") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self.error(file, f"malformed safetensors header ({err})") from err
        if not isinstance(header, dict):
            raise self.error(file, "malformed safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        data_bytes -= length
        infos = {}
        for name, meta in header.items():
            try:
                start, end = (int(offset) for offset in meta["data_offsets"])
                shape = tuple(int(size) for size in meta["shape"])
                info = TensorInfo(file, str(meta["dtype"]), shape, end - start)
                fits = 0 <= start <= end <= data_bytes
            except (KeyError, TypeError, ValueError) as err:
                raise self.error(file, f"malformed safetensors header entry {name!r}") from err
            if not fits:
                raise self.error(file, f"{name}: data offsets {start}..{end} past the data")
            infos[name] = info
        return infos

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor by name, from the headers only; ordered by file, then by name.

        Raises:
            CheckpointFileError: neither ``model.safetensors`` nor the index exists, the index has
                no ``weight_map``, a file is missing or its header malformed, or a file lacks a
                tensor the index maps to it.
        """
        tensors: dict[str, TensorInfo] = {}
        for file, indexed in sorted(self._files().items()):
            stored = self._header(file)
            wanted = stored.keys() if indexed is None else indexed
            missing = sorted(set(wanted) - stored.keys())
            if missing:
                raise self.error(file, f"lacks {len(missing)} indexed tensors: {missing[:3]}")
            tensors.update((name, stored[name]) for name in sorted(wanted))
        return tensors

    @cached_property
    def modules(self) -> dict[str, dict[str, TensorInfo]]:
        """Tensors grouped by module: ``{module: {leaf: TensorInfo}}`` (leaf: ``weight``, ...)."""
        grouped: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
        for name, info in self.tensors.items():
            module, _, leaf = name.rpartition(".")
            grouped[module][leaf] = info
        return dict(grouped)

    def reader(self) -> TensorReader:
        """A :class:`TensorReader` over this checkpoint; use it as a context manager."""
        return TensorReader(self)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` in the given order, one tensor at a time, as stored.

        Raises:
            KeyError: a name is not a tensor of the checkpoint.
            CheckpointFileError: a file cannot be opened or read.
        """
        with self.reader() as reader:
            for name in names:
                yield name, reader[name]


class TensorReader:
    """Tensors of one :class:`Checkpoint` by name; opens each file on first use, closes on exit."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        """Open nothing yet; files are opened (memory-mapped) as their tensors are asked for."""
        self._checkpoint = checkpoint
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every open file."""
        self._handles.clear()
        self._stack.close()

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor ``name`` with its stored dtype and shape, on the CPU.

        Raises:
            KeyError: ``name`` is not a tensor of the checkpoint.
            CheckpointFileError: its file cannot be opened or read.
        """
        from safetensors import SafetensorError, safe_open

        checkpoint = self._checkpoint
        info = checkpoint.tensors.get(name)
        if info is None:
            raise KeyError(f"{name!r} is not a tensor of {checkpoint.root}")
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = safe_open(str(checkpoint.root / info.file), framework="pt")
                self._handles[info.file] = self._stack.enter_context(handle)
            return handle.get_tensor(name)
        except (OSError, SafetensorError) as err:
            raise checkpoint.error(info.file, f"cannot read {name} ({err})") from err
