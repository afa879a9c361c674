from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantdag.store import MANIFEST, ArtifactStore


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
