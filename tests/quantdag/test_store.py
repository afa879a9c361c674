from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from quantdag.runtime import store as store_module
from quantdag.runtime.store import MANIFEST, ArtifactStore


def _make(tmp: Path, files: dict[str, bytes]) -> Path:
    src = tmp / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def test_local_round_trip_is_content_addressed(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    src = _make(tmp_path, {"a.txt": b"alpha", "sub/b.bin": b"\x00\x01"})
    ref = store.put_dir(src, "text-rows", {"rows": 2})
    again = store.put_dir(src, "text-rows", {"rows": 2})
    assert ref.sha256 == again.sha256 and ref.uri == again.uri
    local = store.local_dir(ref)
    assert (local / "sub/b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((local / MANIFEST).read_text())["sha256"] == ref.sha256
    (src / "a.txt").write_bytes(b"changed")
    assert store.put_dir(src, "text-rows").sha256 != ref.sha256


def test_artifact_without_manifest_is_never_read(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put_dir(_make(tmp_path, {"x": b"1"}), "text-rows")
    (Path(ref.uri) / MANIFEST).unlink()
    assert not store.exists(ref)
    with pytest.raises(FileNotFoundError, match="never finished"):
        store.local_dir(ref)


def test_failed_upload_leaves_no_visible_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    src = _make(tmp_path, {"a": b"1", "b": b"2", "c": b"3"})
    calls = {"n": 0}
    original = store.fs.put_file

    def flaky(lpath, rpath, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("upload interrupted")
        return original(lpath, rpath, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", flaky)
    with pytest.raises(ConnectionError):
        store.put_dir(src, "text-rows")
    assert not list((tmp_path / "store").glob(f"objects/**/{MANIFEST}"))
    assert not list((tmp_path / "store").glob("staging/*")), "staging must be cleaned up"


def test_verify_detects_corruption(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put_dir(_make(tmp_path, {"w.bin": b"weights"}), "checkpoint")
    store.verify(ref)
    (Path(ref.uri) / "w.bin").write_bytes(b"weightz")
    with pytest.raises(ValueError, match="w.bin"):
        store.verify(ref)


def test_bad_kind_and_empty_dir_are_refused(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="kind"):
        store.put_dir(_make(tmp_path, {"a": b"1"}), "Bad Kind")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        store.put_dir(tmp_path / "empty", "text-rows")


def test_s3_round_trip(tmp_path: Path, s3_endpoint: str) -> None:
    store = ArtifactStore("s3://quantdag/test-store", cache_dir=str(tmp_path / "cache"))
    ref = store.put_dir(_make(tmp_path, {"rows.jsonl": b'{"a": 1}\n', "images/x.png": b"png"}), "image-text-rows")
    assert ref.uri.startswith("s3://quantdag/test-store/objects/image-text-rows/")
    assert store.exists(ref)
    local = store.local_dir(ref)
    assert (local / "images/x.png").read_bytes() == b"png"
    store.verify(ref)
    staging = "quantdag/test-store/staging"
    assert not (store.fs.exists(staging) and store.fs.ls(staging)), "staging must be empty after a finished upload"


# ------------------------------------------------------------------ digests, parallel hashing
# b.bin is larger than the 8 MiB read chunk, so a file is hashed over several reads
_TREE = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 40000, "sub/deep/c.json": b'{"x": 1}\n', "empty": b""}
# the digest of _TREE under the store's format since its first version: artifacts already stored
# under this sha must keep it
_TREE_SHA = "55828732674973c4c60eb8b3daf5d98a53ad133300ce11e6fc74eedbdd5189b9"


def _reference_tree_sha(files: dict[str, bytes]) -> tuple[str, dict[str, str]]:
    """The artifact digest written out with hashlib: sha256 over sorted ``path\\0file-sha\\n`` lines."""
    per_file = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    lines = "".join(f"{rel}\0{per_file[rel]}\n" for rel in sorted(per_file))
    return hashlib.sha256(lines.encode()).hexdigest(), per_file


def test_sha_is_unchanged_for_the_same_content(tmp_path: Path) -> None:
    expected, per_file = _reference_tree_sha(_TREE)
    assert expected == _TREE_SHA
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put_dir(_make(tmp_path, _TREE), "checkpoint")
    assert ref.sha256 == expected
    assert ref.files == {rel: len(data) for rel, data in _TREE.items()}
    manifest = json.loads((Path(ref.uri) / MANIFEST).read_text())
    assert manifest["file_sha256"] == per_file
    assert list(manifest["file_sha256"]) == sorted(per_file)


def test_files_are_hashed_in_parallel_on_at_most_eight_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _make(tmp_path, {f"shard-{i:02d}.bin": bytes([i]) * 1000 for i in range(20)})
    lock = threading.Lock()
    state = {"running": 0, "peak": 0}
    threads: set[int] = set()
    real = store_module.file_sha256

    def recording(path):
        with lock:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
            threads.add(threading.get_ident())
        time.sleep(0.05)
        try:
            return real(path)
        finally:
            with lock:
                state["running"] -= 1

    monkeypatch.setattr(store_module, "file_sha256", recording)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    ref = ArtifactStore(str(tmp_path / "store")).put_dir(src, "checkpoint")
    assert 2 <= state["peak"] <= 8, state
    assert len(threads) <= 8
    assert ref.sha256 == _reference_tree_sha({f"shard-{i:02d}.bin": bytes([i]) * 1000 for i in range(20)})[0]

    state["peak"] = 0
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    ArtifactStore(str(tmp_path / "store2")).put_dir(src, "checkpoint")
    assert 2 <= state["peak"] <= 3, state


# ------------------------------------------------------------------ scratch dir, move, copy
def test_move_from_scratch_dir_renames_the_files_into_the_store(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    with store.scratch_dir() as scratch:
        assert scratch.parent == (tmp_path / "store" / "staging").resolve()
        for rel, data in _TREE.items():
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_bytes(data)
            (scratch / rel).chmod(0o600)  # as a writer's temporary file may be
        inodes = {rel: os.stat(scratch / rel).st_ino for rel in _TREE}
        ref = store.put_dir(scratch, "checkpoint", move=True)
        for rel in _TREE:
            stored = os.stat(Path(ref.uri) / rel)
            assert stored.st_ino == inodes[rel], f"{rel} was copied, not renamed"
            assert stored.st_mode & 0o777 == 0o644, f"{rel} is {oct(stored.st_mode)}: others cannot read it"
            assert stored.st_nlink == 1, f"{rel} still has a second name"
            assert not (scratch / rel).exists(), "move=True consumes the source"
    assert not scratch.exists(), "the scratch dir is removed on exit"
    assert not list((tmp_path / "store" / "staging").iterdir())
    assert ref.sha256 == _TREE_SHA
    store.verify(ref)
    assert (store.local_dir(ref) / "sub/b.bin").read_bytes() == _TREE["sub/b.bin"]


def test_move_of_an_existing_artifact_consumes_the_source_and_keeps_the_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    first = store.put_dir(_make(tmp_path / "one", _TREE), "checkpoint", move=True)
    stored_ino = os.stat(Path(first.uri) / "a.txt").st_ino
    src = _make(tmp_path / "two", _TREE)
    again = store.put_dir(src, "checkpoint", move=True)
    assert again == first
    assert not [p for p in src.rglob("*") if p.is_file()]
    assert os.stat(Path(first.uri) / "a.txt").st_ino == stored_ino
    store.verify(first)


def test_copy_is_independent_of_the_source(tmp_path: Path) -> None:
    """Without move=True the store keeps its own bytes: rewriting or deleting the source changes nothing."""
    store = ArtifactStore(str(tmp_path / "store"))
    with store.scratch_dir() as scratch:
        (scratch / "w.bin").write_bytes(b"weights")
        ref = store.put_dir(scratch, "checkpoint")
        assert os.stat(scratch / "w.bin").st_ino != os.stat(Path(ref.uri) / "w.bin").st_ino
        (scratch / "w.bin").write_bytes(b"weightz")  # in place: same inode
        with open(scratch / "w.bin", "r+b") as handle:
            handle.write(b"W")
        store.verify(ref)
    src = _make(tmp_path, {"x.bin": b"x" * 4096})
    ref2 = store.put_dir(src, "checkpoint")
    shutil.rmtree(src)
    store.verify(ref2)
    assert (Path(ref.uri) / "w.bin").read_bytes() == b"weights"


def test_move_from_another_filesystem_falls_back_to_a_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("/dev/shm is absent or not writable: no second filesystem to move from")
    store = ArtifactStore(str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    if os.stat(shm).st_dev == os.stat(tmp_path / "store").st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the store: a rename would not cross devices")
    src = Path(tempfile.mkdtemp(prefix="quantdag-test-", dir=shm))
    try:
        for rel, data in _TREE.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        ref = store.put_dir(src, "checkpoint", move=True)
        assert not [p for p in src.rglob("*") if p.is_file()], "move=True consumes the source after copying"
    finally:
        shutil.rmtree(src, ignore_errors=True)
    assert ref.sha256 == _TREE_SHA
    assert os.stat(Path(ref.uri) / "sub/b.bin").st_dev == os.stat(tmp_path / "store").st_dev
    store.verify(ref)
    assert not list((tmp_path / "store" / "staging").iterdir())


def test_failed_move_leaves_no_visible_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    calls = {"n": 0}
    real = os.rename

    def failing(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "no space left on device")
        return real(src, dst, *args, **kwargs)

    with store.scratch_dir() as scratch:
        for name in ("a", "b", "c"):
            (scratch / name).write_bytes(name.encode())
        monkeypatch.setattr(os, "rename", failing)
        with pytest.raises(OSError, match="no space"):
            store.put_dir(scratch, "checkpoint", move=True)
        monkeypatch.undo()
        assert calls["n"] == 2
    assert not list((tmp_path / "store").glob(f"objects/**/{MANIFEST}"))
    assert not list((tmp_path / "store" / "staging").iterdir()), "staging and scratch must be cleaned up"


def test_verify_reports_a_missing_file(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put_dir(_make(tmp_path, _TREE), "checkpoint")
    store.verify(ref)
    (Path(ref.uri) / "sub/deep/c.json").unlink()
    with pytest.raises(ValueError, match="sub/deep/c.json"):
        store.verify(ref)


def test_s3_move_from_scratch_dir(tmp_path: Path, s3_endpoint: str) -> None:
    store = ArtifactStore("s3://quantdag/test-store-move", cache_dir=str(tmp_path / "cache"))
    with store.scratch_dir() as scratch:
        assert scratch.is_dir() and not str(scratch).startswith("quantdag/")
        for rel, data in _TREE.items():
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_bytes(data)
        ref = store.put_dir(scratch, "checkpoint", move=True)
        assert not [p for p in scratch.rglob("*") if p.is_file()], "move=True consumes the source after uploading"
    assert not scratch.exists()
    assert ref.sha256 == _TREE_SHA
    assert ref.uri == f"s3://quantdag/test-store-move/objects/checkpoint/{_TREE_SHA}"
    assert (store.local_dir(ref) / "sub/b.bin").read_bytes() == _TREE["sub/b.bin"]
    store.verify(ref)
    staging = "quantdag/test-store-move/staging"
    assert not (store.fs.exists(staging) and store.fs.ls(staging))
