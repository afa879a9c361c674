"""Content-addressed artifact store on a local directory or S3 (through fsspec/s3fs).

Layout under the store root::

    objects/<kind>/<sha256>/<files...>      the artifact's files
    objects/<kind>/<sha256>/MANIFEST.json   written LAST: an artifact without it does not exist
    staging/<uuid>/...                      uploads in progress (never read)

An artifact's sha256 is computed over its files (sorted relative path + each file's sha256), so the
same content always lands at the same key and a rerun that produces identical bytes is a no-op.
Writes go to ``staging/`` first and are copied to ``objects/`` only when complete; the manifest is
written after the copy. A writer killed at any point leaves no manifest, so readers never see a
half-written artifact (s3fs publishes a partial object when an exception interrupts
``fs.open(..., "wb")``: fsspec/s3fs source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict

MANIFEST = "MANIFEST.json"
_CHUNK = 8 << 20


class ArtifactRef(BaseModel):
    """A small, JSON-serialisable reference to a finished artifact; what tasks return.

    Attributes:
        uri: root of the artifact's files (``/abs/path`` or ``s3://bucket/key``), no trailing slash.
        sha256: hex digest over the artifact's files (see module docstring).
        kind: what it is (``image-text-rows``, ``quantizer-state``, ``checkpoint``, ...).
        files: relative path -> size in bytes.
        meta: small JSON metadata (row counts, shapes, revisions).
    """

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    kind: str
    files: dict[str, int]
    meta: dict[str, Any] = {}

    def path(self, rel: str) -> str:
        """URI of one file of the artifact."""
        return f"{self.uri}/{rel}"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a local file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(files: dict[str, str]) -> str:
    """Digest of a file tree given ``{relative path: file sha256}`` (order independent)."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()


class ArtifactStore:
    """Put and get content-addressed artifacts under ``root`` (local path or ``s3://...``).

    Args:
        root: a local directory (created on first write) or ``s3://bucket/prefix``. For S3 the
            endpoint comes from ``AWS_ENDPOINT_URL`` and credentials from the usual AWS variables.
        cache_dir: where S3 artifacts are downloaded for local use; defaults to
            ``~/.cache/quantdag/artifacts``.
    """

    def __init__(self, root: str, cache_dir: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.is_local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        if self.is_local:
            self._root_path = str(Path(self._root_path).resolve())
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "quantdag" / "artifacts")

    # ----------------------------------------------------------------------------------- names
    def _uri(self, path: str) -> str:
        if self.is_local:
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path}"

    def _obj(self, kind: str, sha: str) -> str:
        return f"{self._root_path}/objects/{kind}/{sha}"

    # ----------------------------------------------------------------------------------- writes
    def put_dir(self, local_dir: str | os.PathLike[str], kind: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Store every file under ``local_dir`` as one artifact and return its reference.

        Raises:
            ValueError: ``local_dir`` is missing, empty, or ``kind`` is not a lowercase slug.
        """
        if not kind or not kind.replace("-", "").isalnum() or kind.lower() != kind:
            raise ValueError(f"artifact kind {kind!r} must be lowercase letters, digits and '-'")
        local = Path(local_dir)
        if not local.is_dir():
            raise ValueError(f"artifact source {local} is not a directory")
        shas: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = file.relative_to(local).as_posix()
            if rel == MANIFEST:
                continue
            shas[rel] = file_sha256(file)
            sizes[rel] = file.stat().st_size
        if not shas:
            raise ValueError(f"artifact source {local} holds no files")
        sha = tree_sha256(shas)
        ref = ArtifactRef(uri=self._uri(self._obj(kind, sha)), sha256=sha, kind=kind, files=sizes, meta=meta or {})
        if self.exists(ref):
            return ref
        final = self._obj(kind, sha)
        staging = f"{self._root_path}/staging/{uuid.uuid4().hex}"
        try:
            for rel in shas:
                self.fs.makedirs(os.path.dirname(f"{staging}/{rel}"), exist_ok=True)
                self.fs.put_file(str(local / rel), f"{staging}/{rel}")
            for rel in shas:
                self.fs.makedirs(os.path.dirname(f"{final}/{rel}"), exist_ok=True)
                if self.is_local:
                    os.replace(f"{staging}/{rel}", f"{final}/{rel}")
                else:
                    self.fs.copy(f"{staging}/{rel}", f"{final}/{rel}")
            manifest = json.dumps({**ref.model_dump(), "file_sha256": shas}, indent=1, sort_keys=True)
            self._write_atomic(f"{final}/{MANIFEST}", manifest.encode())
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        self.fs.invalidate_cache()
        return ref

    def put_file(self, local_file: str | os.PathLike[str], kind: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Store one file as an artifact (the file keeps its name inside the artifact)."""
        src = Path(local_file)
        if not src.is_file():
            raise ValueError(f"artifact source {src} is not a file")
        with tempfile.TemporaryDirectory() as tmp:
            os.link(src, Path(tmp) / src.name) if _same_fs(src, tmp) else shutil.copy2(src, Path(tmp) / src.name)
            return self.put_dir(tmp, kind, meta)

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self.is_local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            # a single PUT: S3 makes the object visible only when the request completes
            self.fs.pipe_file(path, data)

    def store_id(self) -> str:
        """A random id written once to ``<root>/STORE_ID``: a deleted and recreated store gets a new one.

        Flows put it into every step's cache key, so cached references never point into a store
        that no longer holds them.
        """
        path = f"{self._root_path}/STORE_ID"
        self.fs.invalidate_cache()
        if not self.fs.exists(path):
            self.fs.makedirs(self._root_path, exist_ok=True)
            self._write_atomic(path, uuid.uuid4().hex.encode())
        with self.fs.open(path, "rb") as handle:
            return handle.read().decode().strip()

    # ------------------------------------------------------------------------------------ reads
    def exists(self, ref: ArtifactRef) -> bool:
        """True when the artifact's manifest exists (the artifact is complete)."""
        self.fs.invalidate_cache()
        return self.fs.exists(f"{self._strip(ref.uri)}/{MANIFEST}")

    def _strip(self, uri: str) -> str:
        return fsspec.core.url_to_fs(uri)[1] if not self.is_local else uri

    def local_dir(self, ref: ArtifactRef) -> Path:
        """A local directory holding the artifact's files, downloading from S3 when needed.

        Raises:
            FileNotFoundError: the artifact has no manifest (never finished, or deleted).
        """
        if not self.exists(ref):
            raise FileNotFoundError(
                f"artifact {ref.kind} {ref.sha256[:12]} at {ref.uri} has no {MANIFEST}: it was never "
                "finished or was deleted; rerun the step that makes it"
            )
        if self.is_local:
            return Path(ref.uri)
        dest = self.cache_dir / ref.kind / ref.sha256
        if (dest / MANIFEST).exists():
            return dest
        part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")
        remote = self._strip(ref.uri)
        for rel in ref.files:
            (part / rel).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f"{remote}/{rel}", str(part / rel))
        self.fs.get_file(f"{remote}/{MANIFEST}", str(part / MANIFEST))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(part, dest)
        except OSError:  # another process finished the same download first
            shutil.rmtree(part, ignore_errors=True)
        return dest

    def verify(self, ref: ArtifactRef) -> None:
        """Re-hash the artifact's files and compare with its manifest.

        Raises:
            ValueError: a file is missing or its sha256 differs from the manifest.
        """
        root = self.local_dir(ref)
        manifest = json.loads((root / MANIFEST).read_text())
        bad = [rel for rel, sha in manifest["file_sha256"].items() if not (root / rel).exists() or file_sha256(root / rel) != sha]
        if bad:
            raise ValueError(f"artifact {ref.uri} is corrupt: files {bad} differ from its manifest")


def _same_fs(src: Path, tmp: str) -> bool:
    try:
        return os.stat(src).st_dev == os.stat(tmp).st_dev
    except OSError:
        return False
