"""A stored artifact is checked against its manifest, and writing it again replaces a damaged copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fault_rows import fault_row
from quantdag.runtime.store import MANIFEST, QUICK_HASH_BYTES, ArtifactDamagedError, ArtifactRef, ArtifactStore

CONFIG = json.dumps({"quantization_config": {"exclude_modules": ["lm_head", "model.visual*"]}}).encode()
# larger than QUICK_HASH_BYTES: a quick check does not re-hash it unless its stat signature changed
WEIGHTS = bytes(range(256)) * (QUICK_HASH_BYTES // 256 + 4096)


def _tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_bytes(CONFIG)
    (root / "model.safetensors").write_bytes(WEIGHTS)
    return root


def _same_size_edit(data: bytes) -> bytes:
    """``lm_head`` dropped from the exclude list, padded back to the same length."""
    edited = data.replace(b'"lm_head", ', b"")
    return edited + b" " * (len(data) - len(edited))


def test_quick_check_finds_rewritten_resized_missing_and_unexpected_files(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put_dir(_tree(tmp_path / "src"), "checkpoint")
    obj = Path(ref.uri)
    assert store.check(ref) == []
    assert json.loads((obj / MANIFEST).read_text())["file_signature"].keys() == {"config.json", "model.safetensors"}

    (obj / "config.json").write_bytes(_same_size_edit(CONFIG))  # same size: only its sha256 tells
    assert [p.split(" ")[:3] for p in store.check(ref)] == [["config.json", "was", "rewritten"]]

    (obj / "config.json").write_bytes(CONFIG)
    with open(obj / "model.safetensors", "r+b") as handle:  # same size, large: its mtime tells
        handle.seek(len(WEIGHTS) // 2)
        handle.write(b"\xff")
    assert store.check(ref) == [f"model.safetensors was rewritten (sha256 {_sha(obj / 'model.safetensors')[:12]}, "
                                f"{json.loads((obj / MANIFEST).read_text())['file_sha256']['model.safetensors'][:12]} published)"]

    (obj / "model.safetensors").write_bytes(WEIGHTS[:100])
    (obj / "extra.safetensors").write_bytes(b"x")
    (obj / "config.json").unlink()
    assert store.check(ref) == ["config.json is missing", f"model.safetensors has 100 bytes, {len(WEIGHTS)} published",
                                "extra.safetensors is not part of the artifact"]
    with pytest.raises(ArtifactDamagedError, match="config.json is missing"):
        store.verify(ref)


def test_full_verify_catches_what_a_quick_check_cannot(tmp_path: Path) -> None:
    """A same-size rewrite of a large file with its mtime put back passes the quick check only."""
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put_dir(_tree(tmp_path / "src"), "checkpoint")
    weights = Path(ref.uri) / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.write(b"\x00\x00")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.check(ref) == []
    with pytest.raises(ArtifactDamagedError, match="model.safetensors was rewritten"):
        store.verify(ref)


def test_writing_an_artifact_whose_stored_copy_is_damaged_replaces_it(tmp_path: Path, request) -> None:
    row = fault_row(request, "stored object damaged, then written again",
                    "put_dir replaces the damaged copy (unexpected files removed); the object verifies")
    store = ArtifactStore(str(tmp_path / "store"))
    src = _tree(tmp_path / "src")
    ref = store.put_dir(src, "checkpoint")
    obj = Path(ref.uri)
    (obj / "config.json").write_bytes(_same_size_edit(CONFIG))
    (obj / "stray.bin").write_bytes(b"left by someone")
    again = store.put_dir(src, "checkpoint")
    assert again == ref
    assert (obj / "config.json").read_bytes() == CONFIG, "the damaged stored copy was kept"
    assert not (obj / "stray.bin").exists()
    store.verify(ref)
    row.observed("config.json restored, stray.bin removed, verify passes")


def test_a_reference_whose_uri_is_not_a_store_object_is_refused(tmp_path: Path) -> None:
    ref = ArtifactRef(uri=str(tmp_path / "elsewhere"), sha256="0" * 64, kind="checkpoint", files={})
    with pytest.raises(ValueError, match="not an object of a quantdag store"):
        ArtifactStore.for_ref(ref)
    good = ArtifactStore(str(tmp_path / "store")).put_dir(_tree(tmp_path / "src"), "checkpoint")
    assert ArtifactStore.for_ref(good).root == str((tmp_path / "store").resolve())


def test_s3_object_rewritten_after_publication_is_found_and_replaced(tmp_path: Path, s3_endpoint: str) -> None:
    store = ArtifactStore("s3://quantdag/test-integrity", cache_dir=str(tmp_path / "cache"))
    src = _tree(tmp_path / "src")
    ref = store.put_dir(src, "checkpoint")
    key = f"{ref.uri.removeprefix('s3://')}/model.safetensors"
    assert store.check(ref) == []
    store.fs.pipe_file(key, WEIGHTS[:-1] + b"\x00")  # same size: the ETag tells
    assert [p.split(" ")[:3] for p in store.check(ref)] == [["model.safetensors", "was", "rewritten"]]
    assert store.put_dir(src, "checkpoint") == ref
    assert store.check(ref) == []
    store.verify(ref)


def test_s3_local_copy_damaged_is_downloaded_again(tmp_path: Path, s3_endpoint: str) -> None:
    store = ArtifactStore("s3://quantdag/test-integrity-copy", cache_dir=str(tmp_path / "cache"))
    ref = store.put_dir(_tree(tmp_path / "src"), "checkpoint")
    local = store.local_dir(ref)
    (local / "config.json").write_bytes(_same_size_edit(CONFIG))
    assert store.local_dir(ref) == local
    assert (local / "config.json").read_bytes() == CONFIG
    store.verify(ref)


def test_exception_in_the_middle_of_an_s3_write_leaves_no_artifact(tmp_path: Path, s3_endpoint: str,
                                                                   monkeypatch: pytest.MonkeyPatch, request) -> None:
    row = fault_row(request, "exception in the middle of an S3 write",
                    "no manifest: the object does not exist, staging is emptied; the next write completes")
    store = ArtifactStore("s3://quantdag/test-integrity-partial", cache_dir=str(tmp_path / "cache"))
    src = _tree(tmp_path / "src")
    real_put, real_copy = store.fs.put_file, store.fs.copy

    def half_then_fail(lpath, rpath, **kwargs):  # what s3fs leaves when a write is interrupted
        data = Path(lpath).read_bytes()
        store.fs.pipe_file(rpath, data[: len(data) // 2])
        raise ConnectionError("connection reset in the middle of the upload")

    monkeypatch.setattr(store.fs, "put_file", half_then_fail)
    with pytest.raises(ConnectionError):
        store.put_dir(src, "checkpoint")
    calls = {"n": 0}

    def copy_one_then_fail(path1, path2, **kwargs):  # dies after the first object reached objects/
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("connection reset while publishing")
        return real_copy(path1, path2, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", real_put)
    monkeypatch.setattr(store.fs, "copy", copy_one_then_fail)
    with pytest.raises(ConnectionError):
        store.put_dir(src, "checkpoint")
    objects = "quantdag/test-integrity-partial/objects"
    manifests = [p for p in store.fs.find(objects) if p.endswith(MANIFEST)] if store.fs.exists(objects) else []
    assert not manifests, f"an interrupted write published an artifact: {manifests}"
    staging = "quantdag/test-integrity-partial/staging"
    assert not (store.fs.exists(staging) and store.fs.find(staging)), "staging must be emptied"
    monkeypatch.setattr(store.fs, "copy", real_copy)
    ref = store.put_dir(src, "checkpoint")
    store.verify(ref)
    row.observed("2 interrupted writes left no manifest and an empty staging/; the third write verifies")


def _sha(path: Path) -> str:
    from quantdag.runtime.store import file_sha256

    return file_sha256(path)
