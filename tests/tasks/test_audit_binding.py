"""The audit is bound to the checkpoint's bytes, and only those bytes can be registered."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import audit_fixtures as fx
import pytest

from quantdag.model.loading import BaseRef
from quantdag.runtime.lineage import RegistrationRefused, require_audited
from quantdag.runtime.store import ArtifactDamagedError, ArtifactStore
from tasks.audit import AuditError, AuditReport, audit_checkpoint, audit_stored_checkpoint


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fx.build_qwen35_export(tmp_path_factory.mktemp("qwen35-binding"))


@pytest.fixture
def stored(qwen_source: tuple[Path, Path], tmp_path: Path):
    export, base = qwen_source
    store = ArtifactStore(str(tmp_path / "store"))
    checkpoint = store.put_dir(shutil.copytree(export, tmp_path / "export"), "checkpoint")
    base_ref = BaseRef(source_dir=str(base), repo_id=None, revision="main", revision_sha=None, fingerprint="f",
                       is_vlm=True, model_type="qwen3_5")
    return store, checkpoint, base_ref


def test_the_report_names_the_audited_bytes_and_registration_accepts_only_them(stored) -> None:
    store, checkpoint, base = stored
    audit = audit_stored_checkpoint(base, checkpoint, store)
    report = AuditReport.model_validate_json((Path(audit.uri) / "audit_report.json").read_text())
    assert audit.meta["checkpoint_sha256"] == report.checkpoint_sha256 == checkpoint.sha256
    assert report.file_sha256.keys() == checkpoint.files.keys()
    require_audited(store, checkpoint, audit)

    other = checkpoint.model_copy(update={"sha256": "f" * 64})
    with pytest.raises(RegistrationRefused, match=f"audited {checkpoint.sha256[:12]}; rerun"):
        require_audited(store, other, audit)
    failed = audit.model_copy(update={"meta": {**audit.meta, "passed": False}})
    with pytest.raises(RegistrationRefused, match="passed=False"):
        require_audited(store, checkpoint, failed)


def test_exclusions_edited_after_the_audit_are_never_registered(stored, request) -> None:
    from fault_rows import fault_row

    row = fault_row(request, "lm_head removed from both exclude lists after the audit (registration step)",
                    "registration re-hashes, refuses the bytes and unpublishes them; a fresh audit of them fails")
    store, checkpoint, base = stored
    audit = audit_stored_checkpoint(base, checkpoint, store)
    obj = Path(checkpoint.uri)
    fx.edit_excludes(obj, lambda patterns: [p for p in patterns if p != "lm_head"])
    with pytest.raises(ArtifactDamagedError, match="hf_quant_config.json has 350 bytes, 364 published") as caught:
        require_audited(store, checkpoint, audit)
    assert "unpublished" in str(caught.value)
    assert not store.exists(checkpoint), "a checkpoint found damaged must stop being a cache hit"
    assert not audit_checkpoint(obj, base.source_dir, is_vlm=True).passed, "the edit is one the audit catches"
    row.observed("ArtifactDamagedError (config.json, hf_quant_config.json rewritten), manifest removed, nothing registered")


def test_a_same_size_damage_with_its_mtime_put_back_is_caught_before_auditing_and_registering(stored) -> None:
    store, checkpoint, base = stored
    audit = audit_stored_checkpoint(base, checkpoint, store)
    shard = max((Path(checkpoint.uri) / rel for rel in checkpoint.files), key=lambda p: p.stat().st_size)
    stat = shard.stat()
    with open(shard, "r+b") as handle:  # same size, mtime put back: only the bytes tell
        handle.seek(stat.st_size - 1)
        last = handle.read(1)[0]
        handle.seek(stat.st_size - 1)
        handle.write(bytes([last ^ 0xFF]))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ArtifactDamagedError, match=f"{shard.name} was rewritten"):
        require_audited(store, checkpoint, audit)
    with pytest.raises((ArtifactDamagedError, FileNotFoundError)):
        audit_stored_checkpoint(base, checkpoint, store)


def test_a_failed_audit_still_stores_its_report(stored) -> None:
    store, checkpoint, base = stored
    fx.edit_excludes(Path(checkpoint.uri), lambda patterns: [p for p in patterns if p != "lm_head"])
    checkpoint = store.put_dir(Path(checkpoint.uri), "checkpoint")  # the edited files as an artifact of their own
    with pytest.raises(AuditError, match="exclusions"):
        audit_stored_checkpoint(base, checkpoint, store)
    assert list(Path(store.root).glob("objects/audit-report/*/audit_report.json"))
