"""The quantize flow's record keeping: MLflow parent/child runs, registry, Prefect summary.

Kept out of ``flows/quantize.py`` so the flow body only wires steps. Nothing here computes a
result; everything reads the small references that steps return.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from conf.schema import Profile
from quantdag.model.loading import BaseRef
from quantdag.runtime.secrets import redact
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.tracking import Tracker, flatten, numeric, prefect_run_url

log = logging.getLogger(__name__)

_VERSIONS = ("torch", "transformers", "nvidia-modelopt", "prefect", "mlflow", "mlflow-skinny", "triton",
             "flash-linear-attention", "fla-core")
# Which artifact files of a step's output are worth attaching to its MLflow child run.
_ATTACH = {
    "merge_amax": ("amax_table.json", "amax_by_modality.png"),
    "export": ("hf_quant_config.json", "config.json"),
    "evaluate": ("eval_report.json", "eval_report.md"),
    "audit": ("audit_report.json",),
}
# The MLflow dataset context of the fetch steps' rows.
_DATASET_CONTEXT = {"fetch_image_text_heldout": "evaluation-image-text", "fetch_text": "calibration-text",
                    "fetch_image_text": "calibration-image-text"}


def environment_tags() -> dict[str, str]:
    """Versions and hardware of the process running the flow (GPU name, driver, libraries)."""
    tags = {"host.python": platform.python_version()}
    for package in _VERSIONS:
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            tags["gpu.name"] = torch.cuda.get_device_name(0)
            tags["gpu.count"] = str(torch.cuda.device_count())
            tags["gpu.cuda"] = str(torch.version.cuda)
            try:
                import pynvml

                pynvml.nvmlInit()
                tags["gpu.driver"] = str(pynvml.nvmlSystemGetDriverVersion())
            except Exception:  # noqa: BLE001 - NVML is optional
                pass
        else:
            tags["gpu.name"] = "none (cpu)"
    except ImportError:
        pass
    return tags


@dataclass
class Lineage:
    """MLflow records of one quantize flow run."""

    profile: Profile
    base: BaseRef
    flow_run_id: str
    code_version: str
    tracker: Tracker = field(init=False)
    parent_id: str = field(init=False)
    children: dict[str, str] = field(default_factory=dict)
    model_loads: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.tracker = Tracker(self.profile.tracking_uri)
        tags = {
            "base.model": self.base.repo_id or self.base.source_dir,
            "base.revision": self.base.revision,
            "base.revision_sha": self.base.revision_sha or "local",
            "base.fingerprint": self.base.fingerprint,
            "base.model_type": self.base.model_type,
            "profile": self.profile.name,
            "code_version": self.code_version,
            **environment_tags(),
        }
        url = prefect_run_url(self.flow_run_id)
        if url:
            tags["prefect.flow_run_url"] = url
        params = flatten("", json.loads(self.profile.model_dump_json()))
        self.parent_id = self.tracker.parent(self.flow_run_id, f"quantize-{self.profile.name}", tags, params)
        self.tracker.log_json(self.parent_id, "resolved_profile.json", json.loads(redact(self.profile.model_dump_json())))

    def step(self, name: str, ref: ArtifactRef | None, *, cached: bool, store: ArtifactStore | None = None,
             params: dict[str, Any] | None = None, dataset_context: str | None = None) -> None:
        """Log one finished step as a child run: its metrics (``ref.meta``), inputs and files."""
        if ref is None:
            return
        attach = []
        if store is not None:
            root = store.local_dir(ref)
            attach = [root / name_ for name_ in _ATTACH.get(name, ()) if (root / name_).is_file()]
        datasets = None
        if dataset_context:
            datasets = [{"name": f"{self.profile.name}-{dataset_context}", "digest": ref.sha256,
                         "source": str(ref.meta.get("source", ref.uri)), "context": dataset_context}]
        self.children[name] = self.tracker.child(
            self.parent_id, name, cached=cached, params={"artifact.uri": ref.uri, "artifact.sha256": ref.sha256, **(params or {})},
            metrics=ref.meta, artifacts=attach, datasets=datasets,
        )

    def record_steps(self, futures: dict[str, Any], store: ArtifactStore) -> dict[str, bool]:
        """Log a child run (:meth:`step`) for every step that completed, skip the others.

        Args:
            futures: step name -> its future (anything with Prefect's ``state`` and a ``result()``
                that returns the step's one ``ArtifactRef``).
            store: the artifact store the references point into.

        Returns:
            Step name -> whether it was a cache hit (Prefect state ``Cached``), completed steps only.
            Sets :attr:`model_loads`: models the steps that ran read from files (cache hits: none).
        """
        cached, self.model_loads = {}, 0
        for name, future in futures.items():
            state = future.state
            if state.is_completed():
                cached[name] = state.name == "Cached"
                ref = future.result()
                self.step(name, ref, cached=cached[name], store=store, dataset_context=_DATASET_CONTEXT.get(name))
                if not cached[name]:
                    self.model_loads += int(ref.meta.get("model_loads", 0))
        return cached

    def register(self, checkpoint: ArtifactRef, audit: ArtifactRef) -> str:
        """Register the checkpoint as a model version tagged with the base's immutable identity.

        Only what was audited is registered (:func:`require_audited`): ``audit`` must be a passed
        report of exactly this checkpoint, and every byte of the checkpoint is re-hashed first.

        Raises:
            RegistrationRefused: the report is not a passed audit of this checkpoint.
            ArtifactDamagedError: the checkpoint's bytes differ from its manifest (it is then
                unpublished: the next run recomputes the export).
        """
        require_audited(ArtifactStore.for_ref(checkpoint), checkpoint, audit)
        tags = {
            "base_repo": self.base.repo_id or "",
            "base_revision": self.base.revision,
            "base_revision_sha": self.base.revision_sha or "",
            "base_fingerprint": self.base.fingerprint,
            "checkpoint_sha256": checkpoint.sha256,
            "audit_report_sha256": audit.sha256,
            "code_version": self.code_version,
            "prefect_flow_run_id": self.flow_run_id,
        }
        number = self.tracker.register(self.parent_id, self.profile.model_name, checkpoint.uri, tags)
        self.tracker.set_tag(self.parent_id, "registered_model", f"{self.profile.model_name}/{number}")
        return number

    def finish(self, metrics: dict[str, Any], failed: bool = False) -> None:
        """Copy headline metrics and ``model_loads`` (see :meth:`record_steps`) to the parent and end it."""
        values = {**numeric(metrics), "model_loads": float(self.model_loads)}
        if values:
            self.tracker._log(self.parent_id, metrics=values)
        self.tracker.finish(self.parent_id, "FAILED" if failed else "FINISHED")

    def summary_markdown(self, checkpoint: ArtifactRef | None, report: dict[str, Any], version_number: str | None,
                         cached: dict[str, bool]) -> str:
        """The Prefect markdown artifact: where the checkpoint is, the metrics, the MLflow link."""
        lines = [f"# quantize {self.profile.name}", "",
                 f"- base: `{self.base.repo_id or self.base.source_dir}` revision `{self.base.revision_sha or self.base.revision}`",
                 f"- checkpoint: `{checkpoint.uri if checkpoint else 'not produced'}`",
                 f"- registered model: `{self.profile.model_name}` version {version_number or '-'}",
                 f"- MLflow parent run: {self.tracker.run_url(self.parent_id)}",
                 f"- code version: `{self.code_version}`", "", "| step | cached |", "|---|---|"]
        lines += [f"| {step} | {'yes' if hit else 'no'} |" for step, hit in cached.items()]
        if report:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.6g} |" for k, v in report.items() if isinstance(v, int | float)]
        return "\n".join(lines) + "\n"


class RegistrationRefused(ValueError):
    """A checkpoint is not registered: no passed audit of exactly its bytes."""


def require_audited(store: ArtifactStore, checkpoint: ArtifactRef, audit: ArtifactRef) -> None:
    """Check that ``checkpoint`` may be registered: ``audit`` passed on exactly these bytes.

    ``audit`` must be an ``audit-report`` whose ``meta`` says it passed and names the
    checkpoint's sha256 (``tasks.audit.audit_stored_checkpoint`` re-hashed every byte before
    auditing), and every byte of the checkpoint is re-hashed now against the manifest of that
    sha256 (:meth:`ArtifactStore.verify`); a damaged checkpoint is unpublished, so the next run
    recomputes the export instead of hitting its cache.

    Raises:
        RegistrationRefused: (a ``ValueError``) the report is of another kind, failed, or audited
            other bytes; the message names both digests and the fix.
        ArtifactDamagedError: (a ``ValueError``) the checkpoint differs from its manifest.
    """
    audited = audit.meta.get("checkpoint_sha256")
    if audit.kind != "audit-report" or audit.meta.get("passed") is not True or audited != checkpoint.sha256:
        raise RegistrationRefused(
            f"checkpoint {checkpoint.sha256[:12]} at {checkpoint.uri} is not registered: the audit report "
            f"{audit.sha256[:12]} ({audit.kind}, passed={audit.meta.get('passed')}) audited "
            f"{str(audited)[:12] if audited else 'no stored checkpoint'}; rerun so that the audit runs on these bytes")
    store.verify(checkpoint, unpublish=True)


def read_json(store: ArtifactStore, ref: ArtifactRef, name: str) -> Any:
    """Parse one JSON file of a stored artifact."""
    return json.loads((Path(store.local_dir(ref)) / name).read_text())
