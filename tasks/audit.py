"""Audit an exported checkpoint against its BF16 base and its recipe before it is registered.

:func:`audit_checkpoint` runs every rule of :data:`RULES` (defined in ``tasks/audit_rules.py``)
and returns an :class:`AuditReport`; :func:`require_passed` turns a failed report into an
:class:`AuditError` that names every failing module of every rule. Rules only read: the export
is streamed tensor by tensor from its safetensors files (sharded or not), so auditing a 27B
export needs memory for one tensor at a time, not the model.

Rules (sources in each rule's docstring):

- ``quantized-linear-format``: each quantized linear stored in the format the recipe gives its
  module group (NVFP4: U8 packed E2M1 weight, F8_E4M3 block scales over 16 elements, F32 global
  and input scales, finite and positive; W4A16 NVFP4 without the input scale; FP8: F8_E4M3 weight
  without NaN codes, F32 weight and input scales).
- ``exclusions``: every unquantized linear weight matches an ``exclude_modules`` pattern, no
  excluded module carries scales, ``hf_quant_config.json`` and ``config.json`` list the same.
- ``fused-siblings``: q/k/v, gate/up, in_proj_qkv/in_proj_z and in_proj_b/in_proj_a are
  quantized alike and share their per-tensor scales bit for bit (NVFP4: ``weight_scale_2`` and
  ``input_scale``).
- ``mtp-preserved``: the base's ``mtp.*`` tensors are in the export, bit-identical.
- ``loadable``: tokenizer, chat template, generation config and (VLMs) processor load.
- ``kv-cache``: the declared ``quant_algo`` (or ``MIXED_PRECISION`` and ``quantized_layers``) and
  group size are the recipe's, and so is the KV cache (fp8_cast: FP8 without calibrated K/V scales).

The recipe is the one export recorded in the checkpoint's ``meta`` (``recipe_spec``); a directory
audited without one is checked against the reference recipe.

Rules see both checkpoints through :class:`quantdag.format.checkpoint.Checkpoint`: tensor names,
dtype tags and shapes come from the safetensors headers; values are loaded one tensor at a time
and only where a rule needs them (NVFP4 scales, ``mtp.*`` tensors).

An audit is bound to bytes (:func:`audit_stored_checkpoint`): every byte of the stored
checkpoint is re-hashed against its manifest before the rules read it, nothing may change while
they read, and the stored report names the checkpoint's sha256. Registration
(:func:`quantdag.runtime.lineage.require_audited`) accepts only a passed report of exactly that
sha256 and re-hashes the checkpoint once more, so nothing is registered whose bytes differ from
what was audited.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from conf.recipe import RecipeSpec
from quantdag.format.checkpoint import Checkpoint, CheckpointFileError
from quantdag.model.loading import BaseRef
from quantdag.runtime.prefect_task import quantdag_task
from quantdag.runtime.store import MANIFEST, ArtifactDamagedError, ArtifactRef, ArtifactStore
from tasks.audit_rules import RULES, AuditInputs, is_linear_weight

REPORT_KIND = "audit-report"
REPORT_FILE = "audit_report.json"

__all__ = [
    "RULES", "AuditError", "AuditReport", "Finding", "audit_checkpoint", "audit_stored_checkpoint", "audit_task",
    "require_passed",
]


class Finding(BaseModel):
    """One failure: which rule, which module (or tensor, or file), and what is wrong."""

    model_config = ConfigDict(frozen=True)

    rule: str
    module: str
    message: str


class AuditReport(BaseModel):
    """Outcome of :func:`audit_checkpoint`.

    Attributes:
        export_dir: the audited directory.
        passed: True when no rule found anything.
        findings: every failure, in rule order.
        counts: sizes of what was audited (``tensors``, ``quantized_linears``,
            ``unquantized_linears``, ``base_mtp_tensors``), for logging; a count whose files could
            not be read is absent.
        checkpoint_sha256: the stored checkpoint artifact whose bytes were audited (set by
            :func:`audit_stored_checkpoint`; None for a directory audited as it is).
        file_sha256: that artifact's files and their sha256, as re-hashed before the audit.
    """

    model_config = ConfigDict(frozen=True)

    export_dir: str
    passed: bool
    findings: list[Finding]
    counts: dict[str, int]
    checkpoint_sha256: str | None = None
    file_sha256: dict[str, str] = {}


class AuditError(ValueError):
    """An exported checkpoint failed its audit; the message lists every failing module by rule."""


# ------------------------------------------------------------------------------ running
def _counts(inputs: AuditInputs) -> dict[str, int]:
    counts: dict[str, int] = {}
    try:
        tensors = inputs.export.tensors
        counts["tensors"] = len(tensors)
        counts["quantized_linears"] = sum(n.endswith(".weight_scale") for n in tensors)
        counts["unquantized_linears"] = sum(
            is_linear_weight(name, info) and f"{name.removesuffix('weight')}weight_scale" not in tensors
            for name, info in tensors.items()
        )
    except CheckpointFileError:
        pass  # the rules report the unreadable file
    try:
        base_tensors = inputs.base.tensors if inputs.base is not None else {}
        counts["base_mtp_tensors"] = sum(n.startswith("mtp.") for n in base_tensors)
    except CheckpointFileError:
        pass
    return counts


def audit_checkpoint(
    export_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None,
    *,
    is_vlm: bool | None = None,
    recipe: RecipeSpec | None = None,
) -> AuditReport:
    """Run every rule of :data:`RULES` on an exported checkpoint.

    Args:
        export_dir: local directory written by the export step: ``config.json``,
            ``hf_quant_config.json``, ``model.safetensors`` or ``model.safetensors.index.json`` and
            shards, tokenizer files, ``generation_config.json`` and, for VLMs, the processor.
        base_dir: local directory of the BF16 base checkpoint it came from (read for ``mtp.*``
            tensors and the linear layers' ``[out, in]`` shapes); None for a base without
            safetensors (GGUF), which has no ``mtp.*`` tensors.
        is_vlm: whether ``AutoProcessor`` must load too; None decides from ``vision_config`` in
            the export's ``config.json``.
        recipe: the recipe the export was made with; None: the reference recipe (``RecipeSpec()``).

    Returns:
        The report; ``passed`` is False when any rule found a problem. A missing or malformed
        file (``hf_quant_config.json``, a shard, ...) is a finding of the rules that need it.

    Raises:
        ValueError: ``export_dir`` or ``base_dir`` is not a directory.
    """
    export_root = Path(export_dir)
    base_root = Path(base_dir) if base_dir is not None else None
    for label, root in (("export_dir", export_root), ("base_dir", base_root)):
        if root is not None and not root.is_dir():
            raise ValueError(f"{label} {str(root)!r} is not a directory")
    base = Checkpoint(base_root, "base") if base_root is not None else None
    inputs = AuditInputs(Checkpoint(export_root, "export"), base, is_vlm, recipe)
    findings: list[Finding] = []
    for rule, check in RULES.items():
        try:
            issues = check(inputs)
        except CheckpointFileError as err:
            issues = [(err.path, str(err))]
        findings += [Finding(rule=rule, module=module, message=msg) for module, msg in issues]
    return AuditReport(
        export_dir=str(export_root),
        passed=not findings,
        findings=findings,
        counts=_counts(inputs),
    )


def require_passed(report: AuditReport) -> AuditReport:
    """Return ``report`` if it passed, else raise listing every failing module of every rule.

    Raises:
        AuditError: the report has findings; the message has one block per rule naming all of
            its failing modules, then one line per finding.
    """
    if report.passed:
        return report
    by_rule: dict[str, list[Finding]] = defaultdict(list)
    for finding in report.findings:
        by_rule[finding.rule].append(finding)
    lines = [
        f"checkpoint audit of {report.export_dir} failed: {len(report.findings)} finding(s) "
        f"under {len(by_rule)} rule(s)"
    ]
    for rule, found in by_rule.items():
        modules = list(dict.fromkeys(f.module for f in found))
        lines.append(f"[{rule}] {len(modules)} failing: {', '.join(modules)}")
        lines += [f"  {f.module}: {f.message}" for f in found]
    raise AuditError("\n".join(lines))


def audit_stored_checkpoint(base: BaseRef, checkpoint: ArtifactRef, store: ArtifactStore) -> ArtifactRef:
    """Audit the bytes of a stored checkpoint and store the report, bound to the checkpoint's sha256.

    Every byte of ``checkpoint`` is re-hashed against its manifest first (a damaged copy is
    unpublished, so the export recomputes it on the next run), the rules then read the files,
    and a quick check afterwards proves nothing changed while they read.

    Args:
        base: the resolved BF16 base (``source_dir`` read for ``mtp.*``; a GGUF base has none).
        checkpoint: the export step's ``checkpoint`` artifact; its ``meta["recipe_spec"]`` is the
            recipe checked against (absent: the reference recipe).
        store: the store holding ``checkpoint``; the report is written there too.

    Returns:
        The ``audit-report`` artifact (``audit_report.json``: the :class:`AuditReport`); ``meta``
        holds ``passed``, ``checkpoint_sha256`` and the counts.

    Raises:
        ArtifactDamagedError: the checkpoint's bytes differ from its manifest, before or after
            the rules read them (a ``ValueError``; names each file).
        AuditError: any finding; the report artifact is stored first for inspection.
    """
    store.verify(checkpoint, unpublish=True)
    manifest = json.loads((store.local_dir(checkpoint) / MANIFEST).read_text())
    base_dir = None if base.gguf_file else base.source_dir
    spec = checkpoint.meta.get("recipe_spec")
    recipe = RecipeSpec.model_validate(spec) if spec is not None else None
    report = audit_checkpoint(store.local_dir(checkpoint), base_dir, is_vlm=base.is_vlm, recipe=recipe).model_copy(
        update={"checkpoint_sha256": checkpoint.sha256, "file_sha256": manifest["file_sha256"]})
    if changed := store.check(checkpoint):
        raise ArtifactDamagedError(checkpoint, [f"changed while it was audited: {line}" for line in changed])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / REPORT_FILE).write_text(report.model_dump_json(indent=1))
        ref = store.put_dir(tmp, REPORT_KIND, {"passed": report.passed, "checkpoint_sha256": checkpoint.sha256,
                                               **report.counts})
    require_passed(report)
    return ref


@quantdag_task("audit")
def audit_task(
    base: BaseRef, checkpoint: ArtifactRef, artifact_store: str, code_version: str
) -> ArtifactRef:
    """Prefect wrapper of :func:`audit_stored_checkpoint` (``code_version`` only keys the cache)."""
    return audit_stored_checkpoint(base, checkpoint, ArtifactStore(artifact_store))
