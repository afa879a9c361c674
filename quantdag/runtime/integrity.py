"""What "intact" means for a stored artifact: its files against the manifest written when it was published.

The manifest (``MANIFEST.json``, written last by :meth:`quantdag.runtime.store.ArtifactStore.put_dir`)
holds the artifact's tree sha256, every file's size and sha256, and every file's stat signature at
publication (``mtime_ns`` on a local store, the ETag on S3). :func:`differences` compares a listing
of the stored files with it: a quick comparison re-hashes only small files and files whose
signature changed, so it takes seconds for a checkpoint of tens of GB; a full one re-hashes all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Protocol

MANIFEST = "MANIFEST.json"
QUICK_HASH_BYTES = 1 << 20
"""Files up to this size (1 MiB: configs, tokenizer side files, reports) are re-hashed by every
quick comparison; larger ones only when their size or stat signature changed."""

Hasher = Callable[[list[str]], dict[str, str]]
"""``hasher(relative paths) -> {relative path: sha256 hex}`` over one artifact's files."""


class ArtifactRef(Protocol):
    """What this module reads of :class:`quantdag.runtime.store.ArtifactRef`."""

    uri: str
    sha256: str
    kind: str
    files: dict[str, int]


class ArtifactDamagedError(ValueError):
    """A stored artifact differs from its manifest.

    Attributes:
        ref: the artifact.
        problems: one line per difference (missing, resized, rewritten or unexpected file).
    """

    def __init__(self, ref: ArtifactRef, problems: list[str], unpublished: bool = False) -> None:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        fix = ("it was unpublished (manifest removed): rerun, and the step that makes it recomputes it" if unpublished
               else "rerun the step that makes it (the damaged copy is replaced)")
        super().__init__(f"artifact {ref.kind} {ref.sha256[:12]} at {ref.uri} is corrupt: {shown}; {fix}")
        self.ref = ref
        self.problems = problems


def tree_sha256(files: dict[str, str]) -> str:
    """Digest of a file tree given ``{relative path: file sha256}`` (order independent)."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()


def is_manifest(rel: str) -> bool:
    """The manifest, or a temporary file of a manifest being written (``MANIFEST.json.<id>.tmp``)."""
    return rel == MANIFEST or (rel.startswith(f"{MANIFEST}.") and rel.endswith(".tmp"))


def local_listing(root: Path) -> dict[str, tuple[int, str]]:
    """Files under a local directory but its manifest: relative path -> (bytes, ``mtime_ns``)."""
    listing = {}
    if root.is_dir():
        for file in root.rglob("*"):
            rel = file.relative_to(root).as_posix()
            if file.is_file() and not is_manifest(rel):
                stat = file.stat()
                listing[rel] = (stat.st_size, str(stat.st_mtime_ns))
    return listing


def differences(ref: ArtifactRef, manifest: Any, listing: dict[str, tuple[int, str]], hasher: Hasher,
                 full: bool) -> list[str]:
    """What differs between an artifact's stored files and its manifest.

    Args:
        ref: the artifact (its ``sha256`` and ``files`` must be the manifest's).
        manifest: the parsed ``MANIFEST.json``.
        listing: the stored files but the manifest: relative path -> (size in bytes, stat signature).
        hasher: sha256 of stored files, called once with every file to re-hash.
        full: re-hash every file; otherwise only files of at most :data:`QUICK_HASH_BYTES` and
            files whose signature differs from the one published (a file published without a
            signature, by an older store, is re-hashed only when small).

    Returns:
        One line per difference (missing, resized, rewritten, unexpected file; a manifest that
        does not describe ``ref``); empty when the artifact is intact.
    """
    shas, sizes = manifest.get("file_sha256"), manifest.get("files")
    if (not isinstance(shas, dict) or not isinstance(sizes, dict) or set(shas) != set(sizes)
            or manifest.get("sha256") != ref.sha256 or tree_sha256(shas) != ref.sha256):
        return [f"{MANIFEST} does not describe sha256 {ref.sha256}"]
    problems = [] if sizes == ref.files else [f"the reference lists other files than {MANIFEST}"]
    signatures = manifest.get("file_signature") or {}
    to_hash = []
    for rel in sorted(shas):
        if rel not in listing:
            problems.append(f"{rel} is missing")
            continue
        size, signature = listing[rel]
        if size != sizes[rel]:
            problems.append(f"{rel} has {size} bytes, {sizes[rel]} published")
        elif full or size <= QUICK_HASH_BYTES or signatures.get(rel, signature) != signature:
            to_hash.append(rel)
    problems += [f"{rel} is not part of the artifact" for rel in sorted(listing.keys() - shas.keys())]
    for rel, sha in sorted(hasher(to_hash).items()):
        if sha != shas[rel]:
            problems.append(f"{rel} was rewritten (sha256 {sha[:12]}, {shas[rel][:12]} published)")
    return problems
