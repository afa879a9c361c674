"""Fetch steps: a bad input fails naming itself and is never stored; the cache key follows the content."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
from prefect import flow

from conf.schema import ImageTextSource, TextSource
from fault_rows import fault_row
from quantdag.demo.corpus import write_image_text_mirror, write_text_mirror
from quantdag.runtime.sources import source_fingerprint
from quantdag.runtime.store import ArtifactStore
from tasks.fetch import fetch_image_text, fetch_image_text_task, fetch_text, fetch_text_task

SUBSETS = ("sparsetables", "plotqa_cot", "wiki_en")


@pytest.fixture(autouse=True)
def _no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTDAG_TASK_RETRIES", "0")


@pytest.fixture(scope="module")
def mirror_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_text_mirror(tmp_path_factory.mktemp("mirror-template") / "mirror", SUBSETS, rows_per_subset=3)


@pytest.fixture
def mirror(mirror_template: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(mirror_template, tmp_path / "mirror"))


def _image_source(mirror: Path, num_samples: int = 9) -> ImageTextSource:
    return ImageTextSource(path=str(mirror), subsets=SUBSETS, num_samples=num_samples)


def _rewrite_member(shard: Path, change) -> str:
    """Rewrite the first member of a tar shard with ``change(bytes)``; returns the member's name."""
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (member, data) in enumerate(members):
            data = change(data) if index == 0 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return members[0][0].name


@flow(name="fetch-image-text")
def _fetch_flow(source: ImageTextSource, store: str, version: str):
    future = fetch_image_text_task.submit(source, store, version)
    return future.result(), future.state.name


def test_malformed_jsonl_line_names_the_file_and_the_line(tmp_path: Path, request) -> None:
    row = fault_row(request, "malformed jsonl line (a raw control character)",
                    "error names file:line, the JSON error and the fix")
    rows = write_text_mirror(tmp_path / "text" / "train.jsonl", 4)
    lines = rows.read_text().splitlines()
    lines[2] = '{"article": "broken \x01 row", "id": "x"}'
    rows.write_text("\n".join(lines) + "\n")
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ValueError) as caught:
        fetch_text(TextSource(path=str(rows), num_samples=2), store)
    message = str(caught.value)
    assert message.startswith(f"{rows}:3: not a JSON row (Invalid control character at column 21)"), message
    assert "\n" not in message and "fix or delete that line" in message
    assert not list((tmp_path / "store").glob("objects/*/*/MANIFEST.json")), "nothing may be stored"
    row.observed(message[:160])


def test_malformed_image_text_row_names_the_subset_file_and_line(mirror: Path, tmp_path: Path) -> None:
    jsonl = mirror / "plotqa_cot" / "plotqa_cot.jsonl"
    jsonl.write_text(jsonl.read_text() + "[1, 2]\n")
    with pytest.raises(ValueError, match=rf"^{jsonl}:4: a JSON list where a row object is expected"):
        fetch_image_text(_image_source(mirror), ArtifactStore(str(tmp_path / "store")))


def test_missing_subset_names_the_subsets_the_mirror_has(mirror: Path, tmp_path: Path, request) -> None:
    row = fault_row(request, "missing subset", "error names the missing file and the subsets that exist")
    source = ImageTextSource(path=str(mirror), subsets=("sparsetables", "chartqa"), num_samples=2)
    with pytest.raises(ValueError) as caught:
        fetch_image_text(source, ArtifactStore(str(tmp_path / "store")))
    message = str(caught.value)
    assert f"{mirror}/chartqa/chartqa.jsonl not found" in message
    assert "has subsets ['plotqa_cot', 'sparsetables', 'wiki_en']" in message and "image_text.subsets" in message
    row.observed(message[:160])


def test_truncated_png_fails_naming_subset_row_and_member_and_is_never_stored(
        mirror: Path, tmp_path: Path, prefect_api: str, request) -> None:
    row = fault_row(request, "truncated PNG in a tar shard, then the mirror fixed",
                    "fetch fails naming subset, row id and tar member; nothing stored; after the fix the fetch recomputes")
    shard = mirror / "wiki_en" / "media" / "shard_000000.tar"
    original = shard.read_bytes()
    member = _rewrite_member(shard, lambda data: data[: len(data) // 2])
    rows = [json.loads(line) for line in (mirror / "wiki_en" / "wiki_en.jsonl").read_text().splitlines()]
    row_id = next(r["id"] for r in rows if member in json.dumps(r))
    store, version = str(tmp_path / "store"), uuid.uuid4().hex
    with pytest.raises(ValueError) as caught:
        _fetch_flow(_image_source(mirror), store, version)
    message = str(caught.value)
    assert f"image_text subset 'wiki_en' row {row_id!r}" in message, message
    assert f"{shard}:{member}) does not decode" in message and "\n" not in message, message
    assert not list(Path(store).glob("objects/image-text-rows/*/MANIFEST.json")), "a bad sample was stored"

    shard.write_bytes(original)  # the mirror is fixed in place
    ref, state = _fetch_flow(_image_source(mirror), store, version)
    assert state == "Completed" and ref.meta["rows"] == 9
    row.observed(f"fetch failed: ...{message[message.index('row '):][:110]}...; after the fix: {state}")


def test_a_mirror_changed_in_place_is_fetched_again(mirror: Path, tmp_path: Path, prefect_api: str, request) -> None:
    row = fault_row(request, "mirror changed in place after a cached fetch",
                    "the fetch's key follows the files' sizes and mtimes: it recomputes, the sample changes")
    store, version = str(tmp_path / "store"), uuid.uuid4().hex
    first, state = _fetch_flow(_image_source(mirror), store, version)
    assert state == "Completed"
    assert _fetch_flow(_image_source(mirror), store, version)[1] == "Cached"
    jsonl = mirror / "sparsetables" / "sparsetables.jsonl"
    jsonl.write_text(jsonl.read_text().replace('"text": "', '"text": "Q: '))
    second, state = _fetch_flow(_image_source(mirror), store, version)
    assert state == "Completed", "the fetch of a changed mirror was served from the cache"
    assert second.sha256 != first.sha256
    row.observed(f"rerun Cached; after the edit: {state}, new sha {second.sha256[:12]}")


def test_source_fingerprints_follow_content_not_names(tmp_path: Path, s3_endpoint: str) -> None:
    import s3fs

    rows = write_text_mirror(tmp_path / "text.jsonl", 3)
    local = source_fingerprint(TextSource(path=str(rows)))
    assert source_fingerprint(TextSource(path=str(rows), num_samples=7)) == local, "settings are keyed elsewhere"
    rows.write_text(rows.read_text() + rows.read_text().splitlines()[0] + "\n")
    assert source_fingerprint(TextSource(path=str(rows))) != local

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file("quantdag/fingerprint/train.jsonl", rows.read_bytes())
    remote = TextSource(path="s3://quantdag/fingerprint/train.jsonl")
    before = source_fingerprint(remote)
    assert before == source_fingerprint(remote)
    fs.pipe_file("quantdag/fingerprint/train.jsonl", rows.read_bytes().replace(b"a", b"b"))
    assert source_fingerprint(remote) != before, "a rewritten S3 object (new ETag) must change the key"

    sha = "0123456789abcdef0123456789abcdef01234567"
    hub = TextSource(repo_id="abisee/cnn_dailymail", revision=sha)
    assert source_fingerprint(hub) == f"hub:abisee/cnn_dailymail/3.0.0/train@{sha}"


def test_text_fetch_of_a_mirror_is_keyed_on_its_content(tmp_path: Path, prefect_api: str) -> None:
    rows = write_text_mirror(tmp_path / "text.jsonl", 6)

    @flow(name="fetch-text")
    def fetch(source: TextSource, store: str, version: str):
        future = fetch_text_task.submit(source, store, version)
        return future.result(), future.state.name

    store, version, source = str(tmp_path / "store"), uuid.uuid4().hex, TextSource(path=str(rows), num_samples=6)
    first, _ = fetch(source, store, version)
    rows.write_text(rows.read_text().replace("the", "a"))
    second, state = fetch(source, store, version)
    assert state == "Completed" and second.sha256 != first.sha256
