"""Calibration and evaluation sources: where their files are, what they hold, their rows.

Shared by the fetch steps (``tasks/fetch.py``) and the preflight (:mod:`quantdag.runtime.preflight`):

- the layouts: image-text rows in the Nemotron-VLM-Dataset-v2 layout (``<subset>/<subset>.jsonl``
  + ``<subset>/media/shard_*.tar``), text rows as ``.jsonl`` files (one, or a directory of them),
  on a local or ``s3://`` mirror or on the Hub (``hf://datasets/<repo>@<sha>``);
- :func:`source_fingerprint`: what a source holds, for cache keys: the size and stat signature
  (local ``mtime_ns``, S3 ETag) of every file a fetch reads from a mirror, the resolved commit sha
  of a Hub dataset. A mirror fixed in place therefore gets a new key; a renamed one does not;
- :func:`iter_jsonl`: rows of a ``.jsonl`` file, where a bad line fails naming the file, the
  line and the fix;
- :func:`shares`: how a sample is split across subsets.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import fsspec

from conf.schema import ImageTextSource, TextSource

_SHA = re.compile(r"^[0-9a-f]{40}$")


def shares(total: int, subsets: tuple[str, ...]) -> dict[str, int]:
    """Rows per subset for a sample of ``total``: an even split, the first subsets one more."""
    base, extra = divmod(total, len(subsets))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(subsets)}


def hub_dataset_sha(repo_id: str, revision: str) -> str:
    """The commit sha of ``revision`` of a Hub dataset (no request when it is already a full sha).

    Raises:
        huggingface_hub errors: the Hub is unreachable or the repo/revision does not exist.
    """
    if _SHA.match(revision):
        return revision
    from huggingface_hub import HfApi

    return HfApi().dataset_info(repo_id, revision=revision).sha


def image_text_root(source: ImageTextSource) -> tuple[str, str | None]:
    """``(root URL, Hub commit sha or None)`` of an image-text source; the Hub is pinned to a sha."""
    if source.path is not None:
        return source.path.rstrip("/"), None
    sha = hub_dataset_sha(source.repo_id, source.revision)
    return f"hf://datasets/{source.repo_id}@{sha}", sha


def subset_jsonl(root: str, subset: str) -> str:
    """Path of a subset's rows under a mirror root: ``<root>/<subset>/<subset>.jsonl``."""
    return f"{root}/{subset}/{subset}.jsonl"


def existing_subsets(fs: Any, root_path: str) -> list[str]:
    """Subsets a mirror holds: directories ``<name>`` of the root with a ``<name>/<name>.jsonl``."""
    try:
        entries = fs.ls(root_path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory")
    return [name for name in names if fs.exists(subset_jsonl(root_path, name))]


def missing_subset_message(root: str, subset: str, present: list[str]) -> str:
    """One line for a subset whose rows file is missing, naming the subsets the mirror has and the fix."""
    where = (f"{root} has subsets {present}: list only those in image_text.subsets" if present else
             f"{root} holds no subset (no <name>/<name>.jsonl): check image_text.path / image_text.repo_id")
    return f"image_text subset {subset!r}: {subset_jsonl(root, subset)} not found; {where}"


def iter_jsonl(fs: Any, path: str, display: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every non-blank line of a ``.jsonl`` file, streamed.

    Args:
        fs: the fsspec filesystem of ``path``.
        path: the file, in ``fs``'s terms.
        display: how errors name the file (its URL); defaults to ``path``.

    Raises:
        ValueError: a line is not valid JSON or not a JSON object; one line naming the file, the
            line number, what is wrong and the fix.
    """
    display = display or path
    with fs.open(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{display}:{number}: not a JSON row ({err.msg.removesuffix(' at')} at column {err.colno}); "
                                 "fix or delete that line of the source") from None
            if not isinstance(row, dict):
                raise ValueError(f"{display}:{number}: a JSON {type(row).__name__} where a row object is expected; "
                                 "fix or delete that line of the source")
            yield number, row


def text_files(fs: Any, path: str) -> list[str]:
    """The ``.jsonl`` files of a text source: ``path`` itself, or those of the directory ``path``."""
    return sorted(p for p in fs.ls(path, detail=False) if p.endswith(".jsonl")) if fs.isdir(path) else [path]


def _signature(fs: Any, info: dict[str, Any]) -> str:
    """A stat signature of one file: ``size:mtime_ns`` locally, ``size:ETag`` on S3, else size and what the fs has."""
    if "file" in fs.protocol or "local" in fs.protocol:
        stat = os.stat(info["name"])
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    tag = info.get("ETag") or info.get("etag") or info.get("blob_id") or info.get("LastModified") or info.get("mtime")
    return f"{info.get('size')}:{tag}"


def _listing(fs: Any, path: str) -> dict[str, str]:
    """``{path: signature}`` of a file, or of every file in a directory (one level); missing: empty."""
    try:
        entries = fs.ls(path, detail=True) if fs.isdir(path) else [fs.info(path)]
    except FileNotFoundError:
        return {}
    return {entry["name"]: _signature(fs, entry) for entry in entries if entry.get("type", "file") == "file"}


def source_fingerprint(source: ImageTextSource | TextSource) -> str:
    """What a fetch of ``source`` reads, as a short digest for cache keys.

    A mirror (``path``): every file the fetch reads (image-text: each subset's ``.jsonl`` and its
    ``media/`` shards; text: the ``.jsonl`` file or files) by name, size and stat signature, so
    repairing or replacing a file in place changes the key. The Hub: ``hub:<repo>@<sha>`` of the
    resolved revision (the fetch reads that commit).

    Raises:
        huggingface_hub errors: the Hub cannot resolve the revision.
    """
    if source.path is None:
        where = source.repo_id if isinstance(source, ImageTextSource) else f"{source.repo_id}/{source.config}/{source.split}"
        return f"hub:{where}@{hub_dataset_sha(source.repo_id, source.revision)}"
    fs, root = fsspec.core.url_to_fs(source.path.rstrip("/"))
    fs.invalidate_cache()
    files: dict[str, str] = {}
    if isinstance(source, ImageTextSource):
        for subset in source.subsets:
            files |= _listing(fs, subset_jsonl(root, subset)) or {subset_jsonl(root, subset): "missing"}
            files |= {p: sig for p, sig in _listing(fs, f"{root}/{subset}/media").items() if p.endswith(".tar")}
    else:
        files |= {p: sig for p, sig in _listing(fs, root).items() if p.endswith(".jsonl") or p == root} or {root: "missing"}
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{os.path.relpath(name, root) if name != root else '.'}\0{files[name]}\n".encode())
    return f"files:{digest.hexdigest()}"
