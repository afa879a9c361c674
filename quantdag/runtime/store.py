"""Content-addressed artifact store on a local directory or S3 (through fsspec/s3fs).

Layout under the store root::

    objects/<kind>/<sha256>/<files...>      the artifact's files
    objects/<kind>/<sha256>/MANIFEST.json   written LAST: an artifact without it does not exist
    staging/<uuid>/...                      uploads in progress (never read)
    staging/scratch-<random>/...            writers' scratch directories (never read)

An artifact's sha256 is computed over its files (sorted relative path + each file's sha256), so the
same content always lands at the same key and a rerun that produces identical bytes is a no-op.
The files of one artifact are hashed by a small thread pool (hashlib and file reads release the
GIL), which changes the time taken, never the digests.
Writes go to ``staging/`` first and are copied to ``objects/`` only when complete; the manifest is
written after the copy. A writer killed at any point leaves no manifest, so readers never see a
half-written artifact (s3fs publishes a partial object when an exception interrupts
``fs.open(..., "wb")``: fsspec/s3fs source). Only ``objects/`` entries with a manifest are
artifacts: whatever a killed writer leaves under ``staging/`` is never read.

Large local artifacts (an exported checkpoint of 8-60 GB): write them into
:meth:`ArtifactStore.scratch_dir` and store them with ``put_dir(..., move=True)``; on a local store
the files are then renamed into place instead of copied, so storing costs one hashing pass.

Nothing in the store is trusted because it exists. The manifest holds every file's size, sha256
and stat signature at the time it was published (``mtime_ns`` on a local store, the ETag on S3).
:meth:`ArtifactStore.check` compares an artifact with its manifest in seconds whatever its size:
every size, every signature, and the sha256 of every file up to :data:`QUICK_HASH_BYTES` or whose
signature changed; :meth:`ArtifactStore.verify` re-hashes every byte. Cached step results are
checked before they are handed on (``quantdag.runtime.prefect_task``), ``put_dir`` replaces a
damaged stored copy instead of keeping it, and S3 downloads are hashed before they are used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict

from quantdag.runtime.integrity import (MANIFEST, QUICK_HASH_BYTES, ArtifactDamagedError, differences, is_manifest,
                                        local_listing, tree_sha256)

__all__ = ["MANIFEST", "QUICK_HASH_BYTES", "ArtifactDamagedError", "ArtifactRef", "ArtifactStore", "file_sha256",
           "files_sha256", "hash_workers", "tree_sha256"]

_CHUNK = 8 << 20
_MAX_HASH_THREADS = 8
# rename() errors that mean "these two paths cannot share a file": another filesystem or mount
# (EXDEV), or a filesystem that refuses the operation; the file is then copied instead
_NO_RENAME = frozenset({errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

log = logging.getLogger(__name__)


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

    @property
    def store_root(self) -> str:
        """Root of the store holding the artifact: ``uri`` without ``/objects/<kind>/<sha256>``.

        Raises:
            ValueError: ``uri`` does not end with the artifact's own ``objects/<kind>/<sha256>``.
        """
        suffix = f"/objects/{self.kind}/{self.sha256}"
        if not self.uri.endswith(suffix):
            raise ValueError(f"artifact uri {self.uri} does not end with {suffix}: not an object of a quantdag store")
        return self.uri.removesuffix(suffix)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a local file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_workers(n_files: int) -> int:
    """Threads used to hash ``n_files`` files: ``min(8, os.cpu_count(), n_files)``, at least 1."""
    return max(1, min(_MAX_HASH_THREADS, os.cpu_count() or 1, n_files))


def files_sha256(paths: dict[str, Path]) -> dict[str, str]:
    """:func:`file_sha256` of every ``{relative path: local file}``, on up to :func:`hash_workers` threads.

    One file is hashed by one thread (a file's sha256 is sequential), so the wall time is at
    least that of the largest file; the largest files start first to keep the threads busy.
    The digests are exactly those of a sequential :func:`file_sha256` loop.

    Raises:
        OSError: a file cannot be read (the first failure is raised; hashing of files not yet
            started is cancelled).
    """
    order = sorted(paths, key=lambda rel: -paths[rel].stat().st_size)
    workers = hash_workers(len(order))
    if workers == 1:
        return {rel: file_sha256(paths[rel]) for rel in order}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantdag-hash")
    try:
        futures = {rel: pool.submit(file_sha256, paths[rel]) for rel in order}
        return {rel: futures[rel].result() for rel in order}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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

    @classmethod
    def for_ref(cls, ref: ArtifactRef, cache_dir: str | None = None) -> ArtifactStore:
        """The store that holds ``ref`` (see :attr:`ArtifactRef.store_root`)."""
        return cls(ref.store_root, cache_dir)

    # ----------------------------------------------------------------------------------- names
    def _uri(self, path: str) -> str:
        if self.is_local:
            return path
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{protocol}://{path}"

    def _obj(self, kind: str, sha: str) -> str:
        return f"{self._root_path}/objects/{kind}/{sha}"

    # ----------------------------------------------------------------------------------- writes
    def put_dir(self, local_dir: str | os.PathLike[str], kind: str, meta: dict[str, Any] | None = None, *,
                move: bool = False) -> ArtifactRef:
        """Store every file under ``local_dir`` as one artifact and return its reference.

        Sizes in the reference (``files``) are in bytes. Every file is read once to hash it (on up
        to ``min(8, os.cpu_count())`` threads); then, unless the artifact already exists intact
        (:meth:`check`), the files are copied (with ``move=True``: renamed where possible) into
        ``staging/``, moved to ``objects/<kind>/<sha256>/``, files that do not belong there are
        deleted, and the manifest (sizes, sha256 and stat signatures) is written last. A stored
        copy that differs from its manifest is unpublished (manifest removed) and replaced. The
        caller must not change the source files while ``put_dir`` runs (the stored bytes must be
        the hashed bytes).

        Args:
            local_dir: the directory to store (``MANIFEST.json`` in it is ignored).
            kind: a lowercase slug (letters, digits, ``-``).
            meta: small JSON metadata kept in the reference.
            move: consume the source files instead of copying them. On a local store each file is
                renamed into ``staging/`` when ``local_dir`` is on the store's filesystem (write it
                under :meth:`scratch_dir` for that), which moves no bytes: storing a checkpoint of
                tens of GB then costs one hashing pass instead of a hashing pass plus a full copy.
                A file that cannot be renamed (another filesystem or mount: ``EXDEV``; a filesystem
                that refuses renames) is copied and its source deleted; on S3 every file is
                uploaded and its source deleted. After a successful return the artifact's files
                are gone from ``local_dir`` (also when the artifact already existed); after an
                error some may be gone, so the caller must treat ``local_dir`` as consumed either
                way and only delete it.

                Why a move and not a hard link by default: a hard link shares the inode, so a
                caller that later rewrote a source file in place (``open(path, "wb")``,
                ``Path.write_bytes``, ``r+b``) would silently change a stored, content-addressed
                artifact under its old sha256, and read-only modes do not stop a root process. A
                rename leaves the caller no path to the stored file. Callers that keep using
                their files (the default, ``move=False``) get an independent copy.

        Raises:
            ValueError: ``local_dir`` is missing, empty, or ``kind`` is not a lowercase slug.
            OSError: a source file cannot be read or renamed, or the store cannot be written
                (local stores): the artifact then has no manifest and does not exist. With
                ``move=True`` a copied source file that cannot be deleted afterwards also raises,
                although the artifact is then complete.
        """
        if not kind or not kind.replace("-", "").isalnum() or kind.lower() != kind:
            raise ValueError(f"artifact kind {kind!r} must be lowercase letters, digits and '-'")
        local = Path(local_dir)
        if not local.is_dir():
            raise ValueError(f"artifact source {local} is not a directory")
        sources: dict[str, Path] = {}
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = file.relative_to(local).as_posix()
            if rel != MANIFEST:
                sources[rel] = file
        if not sources:
            raise ValueError(f"artifact source {local} holds no files")
        sizes = {rel: file.stat().st_size for rel, file in sources.items()}
        hashed = files_sha256(sources)
        shas = {rel: hashed[rel] for rel in sources}  # sorted by path, as the manifest always was
        sha = tree_sha256(shas)
        ref = ArtifactRef(uri=self._uri(self._obj(kind, sha)), sha256=sha, kind=kind, files=sizes, meta=meta or {})
        final = self._obj(kind, sha)
        if self.exists(ref):
            problems = self.check(ref)
            if not problems:
                if move:
                    _unlink_all(sources.values())
                return ref
            log.warning("stored %s %s at %s is damaged (%s): replacing it", kind, sha[:12], ref.uri,
                        "; ".join(problems[:5]))
            self._unpublish(final)  # readers see no artifact while its files are replaced
        staging = f"{self._root_path}/staging/{uuid.uuid4().hex}"
        try:
            for rel in shas:
                self.fs.makedirs(os.path.dirname(f"{staging}/{rel}"), exist_ok=True)
                if not (move and self.is_local and _rename(sources[rel], f"{staging}/{rel}")):
                    self.fs.put_file(str(sources[rel]), f"{staging}/{rel}")
            for rel in shas:
                self.fs.makedirs(os.path.dirname(f"{final}/{rel}"), exist_ok=True)
                if self.is_local:
                    os.replace(f"{staging}/{rel}", f"{final}/{rel}")
                else:
                    self.fs.copy(f"{staging}/{rel}", f"{final}/{rel}")
            placed = self._listing(final)
            for rel in sorted(placed.keys() - shas.keys()):  # left by a damaged copy or a killed writer
                self.fs.rm_file(f"{final}/{rel}")
            signatures = {rel: placed[rel][1] for rel in shas}
            manifest = json.dumps({**ref.model_dump(), "file_sha256": shas, "file_signature": signatures},
                                  indent=1, sort_keys=True)
            self._write_atomic(f"{final}/{MANIFEST}", manifest.encode())
        finally:
            if self.fs.exists(staging):
                self.fs.rm(staging, recursive=True)
        if move:  # what was copied rather than renamed
            _unlink_all(sources.values())
        self.fs.invalidate_cache()
        return ref

    def put_file(self, local_file: str | os.PathLike[str], kind: str, meta: dict[str, Any] | None = None) -> ArtifactRef:
        """Store one file as an artifact (the file keeps its name inside the artifact).

        The store gets its own copy; ``local_file`` is left as it is.

        Raises:
            ValueError: ``local_file`` is not a file, or ``kind`` is not a lowercase slug.
        """
        src = Path(local_file)
        if not src.is_file():
            raise ValueError(f"artifact source {src} is not a file")
        with tempfile.TemporaryDirectory() as tmp:
            os.link(src, Path(tmp) / src.name) if _same_fs(src, tmp) else shutil.copy2(src, Path(tmp) / src.name)
            return self.put_dir(tmp, kind, meta)

    @contextmanager
    def scratch_dir(self) -> Iterator[Path]:
        """A new empty directory on the store's filesystem, removed with its contents on exit.

        For a local store it is ``<root>/staging/scratch-<random>``, so files written there can be
        stored with ``put_dir(..., move=True)`` by a rename instead of a copy (an exported
        checkpoint is tens of GB); for an S3 store it is an ordinary temporary directory. Nothing
        under ``staging/`` is ever read as an artifact, so a scratch directory left behind by a
        killed writer is only wasted disk space.

        Raises:
            OSError: the directory cannot be created (e.g. the store root is not writable).
        """
        if self.is_local:
            parent = Path(self._root_path) / "staging"
            parent.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix="scratch-", dir=parent))
        else:
            path = Path(tempfile.mkdtemp(prefix="quantdag-scratch-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

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

        An S3 artifact is downloaded once into ``cache_dir`` and every file is hashed against the
        manifest before the copy is used; a copy found damaged later (:meth:`check`'s quick
        comparison) is discarded and downloaded again.

        Raises:
            FileNotFoundError: the artifact has no manifest (never finished, or deleted).
            ArtifactDamagedError: a downloaded file differs from the manifest.
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
            problems = _local_differences(dest, ref)
            if not problems:
                return dest
            log.warning("local copy %s of %s is damaged (%s): downloading it again", dest, ref.uri, "; ".join(problems[:5]))
            _discard(dest)
        part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")
        remote = self._strip(ref.uri)
        try:
            for rel in ref.files:
                (part / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{remote}/{rel}", str(part / rel))
            self.fs.get_file(f"{remote}/{MANIFEST}", str(part / MANIFEST))
            manifest = json.loads((part / MANIFEST).read_text())
            manifest["file_signature"] = {rel: sig for rel, (_, sig) in local_listing(part).items()}
            problems = differences(ref, manifest, local_listing(part), _local_hasher(part), full=True)
            if problems:
                raise ArtifactDamagedError(ref, [f"downloaded {line}" for line in problems])
            (part / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(part, dest)
            except OSError:  # another process finished the same download first
                pass
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return dest

    def check(self, ref: ArtifactRef, *, full: bool = False) -> list[str]:
        """Compare the stored artifact with its manifest; one line per difference, [] when intact.

        Quick by default, in seconds even for a checkpoint of tens of GB: every file's presence and
        size, no unexpected file, and the sha256 of each file of at most :data:`QUICK_HASH_BYTES`
        or whose stat signature (local ``mtime_ns``, S3 ETag) changed since it was published.

        Args:
            ref: the artifact.
            full: re-hash every file instead (reads every byte; S3: streams every object).

        Returns:
            Problems such as ``config.json was rewritten (...)``, ``model.safetensors has 12
            bytes, 40 published``, ``MANIFEST.json is missing``; empty when the artifact matches.
        """
        obj = self._strip(ref.uri)
        self.fs.invalidate_cache()
        try:
            manifest = json.loads(self.fs.cat_file(f"{obj}/{MANIFEST}"))
        except FileNotFoundError:
            return [f"{MANIFEST} is missing (never finished, deleted or being replaced)"]
        except (OSError, ValueError) as err:
            return [f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"]
        return differences(ref, manifest, self._listing(obj), self._hasher(obj), full=full)

    def verify(self, ref: ArtifactRef, *, unpublish: bool = False) -> None:
        """Re-hash every byte of the artifact and compare with its manifest.

        A local artifact is read in full; for S3 the objects are checked by size and ETag
        (:meth:`check`) and the local copy that steps read (:meth:`local_dir`) is read in full (a
        damaged local copy is downloaded again once before the artifact counts as damaged).

        Args:
            ref: the artifact.
            unpublish: when it is damaged, also remove its manifest, so that no later run takes
                it as a cache hit and the step that makes it recomputes it (use where a damage a
                quick check cannot see must not come back: audit, registration).

        Raises:
            ArtifactDamagedError: (a ``ValueError``) the manifest is missing, or a file is missing,
                resized, rewritten or unexpected; the message names each one.
        """
        problems = self.check(ref, full=self.is_local)
        if not problems and not self.is_local:
            try:
                local = self.local_dir(ref)
                problems = _local_differences(local, ref, full=True)
                if problems:  # maybe only the local copy: fetch it again
                    _discard(local)
                    problems = _local_differences(self.local_dir(ref), ref, full=True)
            except ArtifactDamagedError as err:  # the downloaded bytes differ from the manifest
                problems = err.problems
        if problems:
            unpublished = unpublish and self.exists(ref)
            if unpublished:
                self._unpublish(self._strip(ref.uri))
                log.warning("unpublished damaged %s %s at %s: %s", ref.kind, ref.sha256[:12], ref.uri, "; ".join(problems[:5]))
            raise ArtifactDamagedError(ref, problems, unpublished=unpublished)

    def unpublish(self, ref: ArtifactRef) -> None:
        """Remove the artifact's manifest: from then on it does not exist for readers, and the step
        that makes it recomputes it (its files stay until a write of the same artifact replaces them)."""
        self._unpublish(self._strip(ref.uri))

    def _unpublish(self, obj: str) -> None:
        try:
            self.fs.rm_file(f"{obj}/{MANIFEST}")
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def _listing(self, obj: str) -> dict[str, tuple[int, str]]:
        """Files of an object directory but its manifest: relative path -> (bytes, stat signature)."""
        if self.is_local:
            return local_listing(Path(obj))
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(obj, detail=True)
        except FileNotFoundError:
            return {}
        listing = {}
        for path, info in found.items():
            rel = path[len(obj) + 1:]
            if info.get("type", "file") == "file" and rel and not is_manifest(rel):
                listing[rel] = (int(info["size"]), str(info.get("ETag") or info.get("etag") or ""))
        return listing

    def _hasher(self, obj: str) -> Any:
        """``hasher(rels) -> {rel: sha256}`` over files of ``obj`` on up to :func:`hash_workers` threads."""
        if self.is_local:
            return _local_hasher(Path(obj))

        def sha256_of(rel: str) -> str:
            digest = hashlib.sha256()
            with self.fs.open(f"{obj}/{rel}", "rb", block_size=_CHUNK) as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
            return digest.hexdigest()

        def hasher(rels: list[str]) -> dict[str, str]:
            if not rels:
                return {}
            with ThreadPoolExecutor(max_workers=hash_workers(len(rels)), thread_name_prefix="quantdag-hash") as pool:
                futures = {rel: pool.submit(sha256_of, rel) for rel in rels}
                return {rel: future.result() for rel, future in futures.items()}

        return hasher


def _local_hasher(root: Path) -> Any:
    return lambda rels: files_sha256({rel: root / rel for rel in rels})


def _local_differences(root: Path, ref: ArtifactRef, full: bool = False) -> list[str]:
    """:meth:`ArtifactStore.check` of a local copy of an artifact (its own manifest inside)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return [f"{root / MANIFEST} is unreadable ({type(err).__name__}: {err})"]
    return differences(ref, manifest, local_listing(root), _local_hasher(root), full=full)


def _discard(directory: Path) -> None:
    """Move a directory out of the way (one rename), then delete it."""
    trash = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}.damaged")
    try:
        os.replace(directory, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _rename(src: Path, dst: str) -> bool:
    """Rename ``src`` to ``dst`` and make it 0644 like the store's copies (a writer's temporary file
    may be 0600); False (nothing changed) when they cannot be on one filesystem."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in _NO_RENAME:
            return False
        raise
    os.chmod(dst, 0o644)
    return True


def _unlink_all(paths: Any) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _same_fs(src: Path, tmp: str) -> bool:
    try:
        return os.stat(src).st_dev == os.stat(tmp).st_dev
    except OSError:
        return False
