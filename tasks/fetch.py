"""Fetch steps: materialise a deterministic calibration sample as files in the artifact store.

Two sources per kind, same layout:

- image-text rows in the Nemotron-VLM-Dataset-v2 layout (``<subset>/<subset>.jsonl`` + images in
  ``<subset>/media/shard_*.tar``), read from a local or ``s3://`` mirror, or from the Hub through
  ``hf://datasets/<repo>@<sha>`` (huggingface_hub's fsspec filesystem);
- text rows in the ``abisee/cnn_dailymail`` schema, from a local/``s3://`` ``.jsonl`` (or a
  directory of them), or from the Hub through ``datasets.load_dataset`` pinned to a commit sha.

A sample is exactly ``num_samples`` rows chosen by ``random.Random(seed)``; asking for more rows
than a source holds is an error, never a silent shortfall.
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
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.prefect_task import quantdag_task

IMAGE_TEXT_KIND = "image-text-rows"
TEXT_KIND = "text-rows"


def _hub_dataset_root(repo_id: str, revision: str) -> tuple[str, str]:
    from huggingface_hub import HfApi

    sha = HfApi().dataset_info(repo_id, revision=revision).sha
    return f"hf://datasets/{repo_id}@{sha}", sha


def _split_counts(total: int, subsets: tuple[str, ...]) -> dict[str, int]:
    base, extra = divmod(total, len(subsets))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(subsets)}


def _row_images(row: dict[str, Any]) -> list[str]:
    names = []
    for message in row.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            names += [part["image"] for part in content if part.get("type") == "image" and part.get("image")]
    return names


def _read_jsonl(fs: Any, path: str) -> list[dict[str, Any]]:
    with fs.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _extract_images(fs: Any, media_dir: str, wanted: set[str], dest: Path) -> set[str]:
    """Stream the subset's tar shards and write the wanted members under ``dest``; return found names."""
    found: set[str] = set()
    shards = sorted(p for p in fs.ls(media_dir, detail=False) if p.endswith(".tar"))
    for shard in shards:
        if found == wanted:
            break
        with fs.open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in wanted and name not in found:
                    (dest / name).write_bytes(tar.extractfile(member).read())
                    found.add(name)
    return found


def fetch_image_text(source: ImageTextSource, store: ArtifactStore, exclude: ArtifactRef | None = None) -> ArtifactRef:
    """Sample ``source.num_samples`` image-text rows, split evenly across ``source.subsets``.

    ``exclude`` (an earlier ``image-text-rows`` artifact) removes its rows from the candidates,
    so a held-out evaluation sample never shares a row with the calibration sample.

    Returns:
        An ``image-text-rows`` artifact: ``rows.jsonl`` (each row plus ``subset``; image paths
        rewritten to ``images/<subset>/<file>``) and the image files. ``meta`` holds ``rows``,
        ``per_subset``, ``source`` and the resolved Hub ``revision_sha`` (or None for a mirror).

    Raises:
        ValueError: a subset's jsonl is missing, holds fewer rows than its share, or a row's image
            is in none of the subset's tar shards.
    """
    if source.path is not None:
        root, sha = source.path.rstrip("/"), None
    else:
        root, sha = _hub_dataset_root(source.repo_id, source.revision)
    fs, root_path = fsspec.core.url_to_fs(root)
    counts = _split_counts(source.num_samples, source.subsets)
    excluded = {(row["subset"], row.get("id")) for row in read_rows(store, exclude)[1]} if exclude else set()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        selected: list[dict[str, Any]] = []
        for subset, share in counts.items():
            jsonl = f"{root_path}/{subset}/{subset}.jsonl"
            if not fs.exists(jsonl):
                raise ValueError(f"image_text subset {subset!r}: {root}/{subset}/{subset}.jsonl not found")
            rows = [row for row in _read_jsonl(fs, jsonl) if (subset, row.get("id")) not in excluded]
            if len(rows) < share:
                raise ValueError(
                    f"image_text subset {subset!r} holds {len(rows)} usable rows ({len(excluded)} excluded as "
                    f"calibration rows), {share} needed for num_samples={source.num_samples}; lower "
                    "image_text.num_samples / eval.image_text_samples or add subsets"
                )
            picked = sorted(random.Random(f"{source.seed}:{subset}").sample(range(len(rows)), share))
            chosen = [rows[i] for i in picked]
            wanted = {name for row in chosen for name in _row_images(row)}
            image_dir = out / "images" / subset
            image_dir.mkdir(parents=True, exist_ok=True)
            found = _extract_images(fs, f"{root_path}/{subset}/media", wanted, image_dir)
            if missing := sorted(wanted - found):
                raise ValueError(f"image_text subset {subset!r}: images {missing[:5]} ({len(missing)}) not in any media/shard_*.tar")
            for row in chosen:
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
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".jsonl")) if fs.isdir(path) else [path]
        if not files:
            raise ValueError(f"text.path {source.path} holds no .jsonl files")
        return [row for file in files for row in _read_jsonl(fs, file)], None
    import datasets
    from huggingface_hub import HfApi

    sha = HfApi().dataset_info(source.repo_id, revision=source.revision).sha
    dataset = datasets.load_dataset(source.repo_id, source.config, split=source.split, revision=sha)
    return [dict(row) for row in dataset], sha


def fetch_text(source: TextSource, store: ArtifactStore) -> ArtifactRef:
    """Sample exactly ``source.num_samples`` text rows (``source.text_field`` must be non-empty).

    Returns:
        A ``text-rows`` artifact: ``rows.jsonl`` in the source schema; ``meta`` holds ``rows``,
        ``characters``, ``source`` and the resolved Hub ``revision_sha`` (None for a mirror).

    Raises:
        ValueError: the source has fewer usable rows than requested, or rows lack the text field.
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
    """Local directory of a rows artifact and its rows (``rows.jsonl`` parsed)."""
    root = store.local_dir(ref)
    with open(root / "rows.jsonl", encoding="utf-8") as handle:
        return root, [json.loads(line) for line in handle if line.strip()]


@quantdag_task("fetch_image_text", retries=2)
def fetch_image_text_task(source: ImageTextSource, artifact_store: str, code_version: str,
                          exclude: ArtifactRef | None = None) -> ArtifactRef:
    """Prefect wrapper of :func:`fetch_image_text` (cached on source, store, exclusions and code version)."""
    return fetch_image_text(source, ArtifactStore(artifact_store), exclude)


@quantdag_task("fetch_text", retries=2)
def fetch_text_task(source: TextSource, artifact_store: str, code_version: str) -> ArtifactRef:
    """Prefect wrapper of :func:`fetch_text` (cached on source, store and code version)."""
    return fetch_text(source, ArtifactStore(artifact_store))
