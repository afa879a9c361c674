"""Fetch steps: materialise a deterministic calibration sample as files in the artifact store.

Two sources per kind, same layout (:mod:`quantdag.runtime.sources`):

- image-text rows in the Nemotron-VLM-Dataset-v2 layout (``<subset>/<subset>.jsonl`` + images in
  ``<subset>/media/shard_*.tar``), read from a local or ``s3://`` mirror, or from the Hub through
  ``hf://datasets/<repo>@<sha>`` (huggingface_hub's fsspec filesystem);
- text rows in the ``abisee/cnn_dailymail`` schema, from a local/``s3://`` ``.jsonl`` (or a
  directory of them), or from the Hub through ``datasets.load_dataset`` pinned to a commit sha.

A sample is exactly ``num_samples`` rows chosen by ``random.Random(seed)``; asking for more rows
than a source holds is an error, never a silent shortfall. A sample is validated before it is
stored (every row parses, every chosen row's images decode), so a bad input fails the fetch,
naming the file and line, or the subset, row and tar member, and never becomes a cached artifact.
Both steps are cached on what the source holds (:func:`quantdag.runtime.sources.source_fingerprint`:
sizes and mtimes or ETags of a mirror's files, a Hub commit sha), so fixing a mirror in place
recomputes the sample.
"""

from __future__ import annotations

import json
import random
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from conf.schema import ImageTextSource, TextSource
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.sources import (existing_subsets, hub_dataset_sha, image_text_root, iter_jsonl,
                                      missing_subset_message, shares, source_fingerprint, subset_jsonl, text_files)
from quantdag.runtime.store import ArtifactRef, ArtifactStore

IMAGE_TEXT_KIND = "image-text-rows"
TEXT_KIND = "text-rows"


def _row_images(row: dict[str, Any]) -> list[str]:
    names = []
    for message in row.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            names += [part["image"] for part in content
                      if isinstance(part, dict) and part.get("type") == "image" and part.get("image")]
    return names


def _check_messages(row: dict[str, Any], where: str) -> None:
    """Raise naming ``where`` (``file:line``) when a row's ``messages`` are not chat messages."""
    messages = row.get("messages")
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str | list)
        for m in messages)
    if not ok:
        raise ValueError(f"{where}: row {row.get('id')!r} has no chat 'messages' (a list of {{role, content}}); "
                         "fix or delete that line of the source")


def _extract_images(fs: Any, root: str, subset: str, root_path: str, wanted: set[str], dest: Path) -> dict[str, str]:
    """Stream the subset's tar shards and write the wanted members under ``dest``.

    Returns:
        File name -> where it came from (``<root>/<subset>/media/<shard>.tar:<member>``).

    Raises:
        ValueError: a shard is not a readable tar archive (names the shard).
    """
    found: dict[str, str] = {}
    media = f"{root_path}/{subset}/media"
    shards = sorted(p for p in fs.ls(media, detail=False) if p.endswith(".tar")) if fs.exists(media) else []
    for shard in shards:
        if found.keys() == wanted:
            break
        shown = f"{root}/{subset}/media/{shard.rsplit('/', 1)[-1]}"
        try:
            with fs.open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in wanted and name not in found:
                        (dest / name).write_bytes(tar.extractfile(member).read())
                        found[name] = f"{shown}:{member.name}"
        except tarfile.TarError as err:
            raise ValueError(f"image_text subset {subset!r}: {shown} is not a readable tar archive ({err}); "
                             "replace that shard in the mirror") from None
    return found


def _check_images(subset: str, rows: list[tuple[str, dict[str, Any]]], image_dir: Path, members: dict[str, str]) -> None:
    """Decode every image of the chosen rows in full; raise naming the first that does not decode.

    Raises:
        ValueError: one line with the subset, the row id and its line, the tar member, the
            decoder's error and the fix.
    """
    from PIL import Image

    for where, row in rows:
        for name in _row_images(row):
            file = Path(name).name
            try:
                with Image.open(image_dir / file) as image:
                    image.load()
            except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, zlib errors...
                raise ValueError(
                    f"image_text subset {subset!r} row {row.get('id')!r} ({where}): image {file!r} (tar member "
                    f"{members[file]}) does not decode: {type(err).__name__}: {err}; replace that member in the "
                    "mirror or delete the row") from None


def fetch_image_text(source: ImageTextSource, store: ArtifactStore, exclude: ArtifactRef | None = None) -> ArtifactRef:
    """Sample ``source.num_samples`` image-text rows, split evenly across ``source.subsets``.

    ``exclude`` (an earlier ``image-text-rows`` artifact) removes its rows from the candidates,
    so a held-out evaluation sample never shares a row with the calibration sample.

    Returns:
        An ``image-text-rows`` artifact: ``rows.jsonl`` (each row plus ``subset``; image paths
        rewritten to ``images/<subset>/<file>``) and the image files. ``meta`` holds ``rows``,
        ``per_subset``, ``source`` and the resolved Hub ``revision_sha`` (or None for a mirror).

    Raises:
        ValueError: a subset's jsonl is missing (names the subsets the source has), a line of it
            is not a JSON row (names file and line), a subset holds fewer rows than its share, a
            chosen row has no chat messages, one of its images is in none of the subset's tar
            shards, or does not decode (names subset, row id and tar member).
    """
    root, sha = image_text_root(source)
    fs, root_path = fsspec.core.url_to_fs(root)
    counts = shares(source.num_samples, source.subsets)
    excluded = {(row["subset"], row.get("id")) for row in read_rows(store, exclude)[1]} if exclude else set()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        selected: list[dict[str, Any]] = []
        for subset, share in counts.items():
            jsonl = subset_jsonl(root_path, subset)
            if not fs.exists(jsonl):
                raise ValueError(missing_subset_message(root, subset, existing_subsets(fs, root_path)))
            shown = subset_jsonl(root, subset)
            rows = [(f"{shown}:{number}", row) for number, row in iter_jsonl(fs, jsonl, shown)
                    if (subset, row.get("id")) not in excluded]
            if len(rows) < share:
                raise ValueError(
                    f"image_text subset {subset!r} holds {len(rows)} usable rows ({len(excluded)} excluded as "
                    f"calibration rows), {share} needed for num_samples={source.num_samples}; lower "
                    "image_text.num_samples / eval.image_text_samples or add subsets"
                )
            picked = sorted(random.Random(f"{source.seed}:{subset}").sample(range(len(rows)), share))
            chosen = [rows[i] for i in picked]
            for where, row in chosen:
                _check_messages(row, where)
            wanted = {Path(name).name for _, row in chosen for name in _row_images(row)}
            image_dir = out / "images" / subset
            image_dir.mkdir(parents=True, exist_ok=True)
            found = _extract_images(fs, root, subset, root_path, wanted, image_dir)
            if missing := sorted(wanted - found.keys()):
                raise ValueError(f"image_text subset {subset!r}: images {missing[:5]} ({len(missing)}) are in no "
                                 f"{root}/{subset}/media/shard_*.tar; add them to the mirror or delete their rows")
            _check_images(subset, chosen, image_dir, found)
            for _, row in chosen:
                selected.append({**_rewrite_images(row, subset), "subset": subset})
        with open(out / "rows.jsonl", "w", encoding="utf-8") as handle:
            for row in selected:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        meta = {"rows": len(selected), "per_subset": counts, "source": root, "revision_sha": sha, "seed": source.seed}
        return store.put_dir(out, IMAGE_TEXT_KIND, meta)


def _rewrite_images(row: dict[str, Any], subset: str) -> dict[str, Any]:
    row = json.loads(json.dumps(row))
    for message in row.get("messages", []):
        if isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "image" and part.get("image"):
                    part["image"] = f"images/{subset}/{Path(part['image']).name}"
    return row


def _read_text_rows(source: TextSource) -> tuple[list[dict[str, Any]], str | None]:
    if source.path is not None:
        fs, path = fsspec.core.url_to_fs(source.path)
        files = text_files(fs, path)
        if not files:
            raise ValueError(f"text.path {source.path} holds no .jsonl files")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        shown = (lambda f: f) if protocol in ("file", "local") else (lambda f: f"{protocol}://{f}")
        return [row for file in files for _, row in iter_jsonl(fs, file, shown(file))], None
    import datasets

    sha = hub_dataset_sha(source.repo_id, source.revision)
    dataset = datasets.load_dataset(source.repo_id, source.config, split=source.split, revision=sha)
    return [dict(row) for row in dataset], sha


def fetch_text(source: TextSource, store: ArtifactStore) -> ArtifactRef:
    """Sample exactly ``source.num_samples`` text rows (``source.text_field`` must be non-empty).

    Returns:
        A ``text-rows`` artifact: ``rows.jsonl`` in the source schema; ``meta`` holds ``rows``,
        ``characters``, ``source`` and the resolved Hub ``revision_sha`` (None for a mirror).

    Raises:
        ValueError: a line of a mirror's ``.jsonl`` is not a JSON row (names file and line), or
            the source has fewer usable rows than requested.
    """
    rows, sha = _read_text_rows(source)
    usable = [row for row in rows if isinstance(row.get(source.text_field), str) and row[source.text_field].strip()]
    if len(usable) < source.num_samples:
        raise ValueError(
            f"text source {source.path or source.repo_id} has {len(usable)} rows with a non-empty "
            f"{source.text_field!r}, {source.num_samples} requested; lower text.num_samples"
        )
    picked = sorted(random.Random(source.seed).sample(range(len(usable)), source.num_samples))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with open(out / "rows.jsonl", "w", encoding="utf-8") as handle:
            for i in picked:
                handle.write(json.dumps(usable[i], ensure_ascii=False) + "\n")
        meta = {
            "rows": len(picked),
            "characters": sum(len(usable[i][source.text_field]) for i in picked),
            "source": source.path or f"{source.repo_id}/{source.config}/{source.split}",
            "revision_sha": sha,
            "seed": source.seed,
        }
        return store.put_dir(out, TEXT_KIND, meta)


def read_rows(store: ArtifactStore, ref: ArtifactRef) -> tuple[Path, list[dict[str, Any]]]:
    """Local directory of a rows artifact and its rows (``rows.jsonl`` parsed).

    Raises:
        ValueError: a line of ``rows.jsonl`` is not a JSON row (names the file and line).
    """
    root = store.local_dir(ref)
    fs = fsspec.filesystem("file")
    return root, [row for _, row in iter_jsonl(fs, str(root / "rows.jsonl"))]


def source_key(inputs: dict[str, Any]) -> str:
    """Cache-key part of a fetch: what its ``source`` holds (:func:`quantdag.runtime.sources.source_fingerprint`)."""
    return source_fingerprint(inputs["source"])


@quantdag_task("fetch_image_text", retries=2, content_key=source_key)
def fetch_image_text_task(source: ImageTextSource, artifact_store: str, code_version: str,
                          exclude: ArtifactRef | None = None) -> ArtifactRef:
    """Prefect wrapper of :func:`fetch_image_text` (cached on what the source holds, its settings,
    the store, exclusions and the code version)."""
    return fetch_image_text(source, ArtifactStore(artifact_store), exclude)


@quantdag_task("fetch_image_text_heldout", retries=2, content_key=source_key)
def fetch_image_text_heldout_task(source: ImageTextSource, artifact_store: str, code_version: str,
                                  exclude: ArtifactRef | None = None) -> ArtifactRef:
    """The fetch of held-out evaluation rows (never a calibration row: ``exclude`` is the calibration
    sample): :func:`fetch_image_text` under its own name in the Prefect UI."""
    return fetch_image_text(source, ArtifactStore(artifact_store), exclude)


@quantdag_task("fetch_text", retries=2, content_key=source_key)
def fetch_text_task(source: TextSource, artifact_store: str, code_version: str) -> ArtifactRef:
    """Prefect wrapper of :func:`fetch_text` (cached on what the source holds, its settings, the
    store and the code version)."""
    return fetch_text(source, ArtifactStore(artifact_store))
