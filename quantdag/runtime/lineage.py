"""The quantize flow's record keeping: MLflow parent/child runs, registry, Prefect summary.

Kept out of ``flows/quantize.py`` so the flow body only wires steps. Nothing here computes a
result; everything reads the small references that steps return.

The MLflow parent run is named like the Prefect flow run (``quantdag.runtime.naming``) and its
description links the Prefect run; the Prefect summary links the MLflow run and the model
version; the model version (``quantdag.runtime.registry``) links both and the reports
(``quantdag.runtime.notes`` writes the markdown).
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
from quantdag.runtime import notes, registry
from quantdag.runtime.naming import run_name
from quantdag.runtime.secrets import redact
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.tracking import DESCRIPTION_TAG, LOCAL_MLFLOW_UI, Tracker, flatten, numeric, prefect_run_link

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
    """MLflow records of one quantize flow run.

    Attributes:
        name: the run's name in both UIs (default :func:`quantdag.runtime.naming.run_name`; the
            flow passes the Prefect flow run's name, which keeps a name given in the UI).
        refs: step name -> its reference, for every step logged (:meth:`step`).
        version: the model version :meth:`register` made or found, else None.
    """

    profile: Profile
    base: BaseRef
    flow_run_id: str
    code_version: str
    name: str | None = None
    tracker: Tracker = field(init=False)
    parent_id: str = field(init=False)
    children: dict[str, str] = field(default_factory=dict)
    refs: dict[str, ArtifactRef] = field(default_factory=dict)
    model_loads: int = field(init=False, default=0)
    version: registry.Version | None = field(init=False, default=None)
    audit_meta: dict[str, Any] = field(init=False, default_factory=dict)
    checkpoint: ArtifactRef | None = field(init=False, default=None)
    prefect_url: str | None = field(init=False, default=None)
    prefect_note: str = field(init=False, default="")

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
        self.name = self.name or run_name(self.profile, self.base)
        self.prefect_url, self.prefect_note = prefect_run_link(self.flow_run_id)
        if self.prefect_url:
            tags["prefect.flow_run_url"] = self.prefect_url
        params = flatten("", json.loads(self.profile.model_dump_json()))
        self.parent_id = self.tracker.parent(self.flow_run_id, self.name, tags, params)
        self.tracker.log_json(self.parent_id, "resolved_profile.json", json.loads(redact(self.profile.model_dump_json())))
        self.describe_parent()

    def describe_parent(self, metrics: dict[str, Any] | None = None) -> None:
        """Write the parent run's description (:func:`quantdag.runtime.notes.parent_description`):
        the Prefect link, base, recipe, data, and once known the metrics and the model version."""
        version = (self.version.name, self.version.number) if self.version else None
        text = notes.parent_description(self.name, self.profile, self.base, self.prefect_markdown(), version, metrics)
        self.tracker.set_tag(self.parent_id, DESCRIPTION_TAG, text)

    def prefect_markdown(self) -> str:
        """The Prefect flow run as markdown: a link, and how to open it when its API serves no UI."""
        return notes.prefect_line(self.prefect_url, self.prefect_note, self.name)

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
        self.refs[name] = ref
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

        The version (one per checkpoint sha256, :mod:`quantdag.runtime.registry`) gets the alias
        ``candidate``, the audit verdict, and this run as an output; versions of the model whose
        checkpoints are gone from this store are marked missing first. :meth:`finish` then adds
        this run's evaluation and rewrites the version's description.

        Returns:
            The version number.

        Raises:
            RegistrationRefused: the report is not a passed audit of this checkpoint.
            ArtifactDamagedError: the checkpoint's bytes differ from its manifest (it is then
                unpublished: the next run recomputes the export).
        """
        store = ArtifactStore.for_ref(checkpoint)
        require_audited(store, checkpoint, audit)
        client, name = self.tracker.client, self.profile.model_name
        if missing := registry.mark_missing(client, name, lambda version: _present(store, version)):
            log.warning("%s versions %s: their checkpoints are gone from %s; marked missing, aliases removed",
                        name, ", ".join(missing), store.root)
        tags = {
            "base_repo": self.base.repo_id or "",
            "base_revision": self.base.revision,
            "base_revision_sha": self.base.revision_sha or "",
            "base_fingerprint": self.base.fingerprint,
            "checkpoint_sha256": checkpoint.sha256,
            "audit_report_sha256": audit.sha256,
            "audit": "passed",
            "recipe": self.profile.recipe.name,
            "code_version": self.code_version,
            "prefect_flow_run_id": self.flow_run_id,
        }
        self.version = registry.register_checkpoint(client, self.tracker.experiment_id, self.parent_id, name,
                                                    checkpoint.uri, tags)
        registry.set_candidate(client, self.version)
        self.checkpoint, self.audit_meta = checkpoint, dict(audit.meta)
        self.tracker.set_tag(self.parent_id, "registered_model", f"{name}/{self.version.number}")
        return self.version.number

    def _describe_version(self, metrics: dict[str, Any]) -> None:
        """Add this run's evaluation to the registered version and rewrite its description."""
        client, version = self.tracker.client, self.version
        links = {"mlflow_run": self.tracker.run_path(self.parent_id), "prefect": self.prefect_markdown(),
                 "audit_report": self._report_link("audit", "audit_report.json"),
                 "eval_report": self._report_link("evaluate", "eval_report.md")}
        if evaluated := self.refs.get("evaluate"):
            registry.record_evaluation(client, version, self.parent_id, evaluated.sha256, metrics, {
                "mlflow_run": links["mlflow_run"], "prefect_run": self.prefect_url or "", "eval_report": links["eval_report"]})
        header = notes.version_header(self.profile, self.base, self.checkpoint, self.audit_meta, metrics, links)
        registry.describe(client, version, header)

    def _report_link(self, step: str, file: str) -> str:
        """Relative MLflow link to a report attached to a step's child run, or "" when it has none."""
        child = self.children.get(step)
        return f"{self.tracker.run_path(child)}/artifacts/{file}" if child else ""

    def finish(self, metrics: dict[str, Any], failed: bool = False) -> None:
        """Copy headline metrics and ``model_loads`` (see :meth:`record_steps`) to the parent and end it.

        After a registration (:meth:`register`) it also records the evaluation on the model
        version, rewrites the version's and the parent's descriptions (metrics, version link).
        """
        values = {**numeric(metrics), "model_loads": float(self.model_loads)}
        if values:
            self.tracker._log(self.parent_id, metrics=values)
        if not failed and self.version is not None:
            self._describe_version(metrics)
            self.describe_parent(metrics)
        self.tracker.finish(self.parent_id, "FAILED" if failed else "FINISHED")

    def summary_markdown(self, checkpoint: ArtifactRef | None, report: dict[str, Any], version_number: str | None,
                         cached: dict[str, bool]) -> str:
        """The Prefect markdown artifact (:func:`quantdag.runtime.notes.run_summary`): where the
        checkpoint is, links to the MLflow run and model version, cached steps, the metrics."""
        ui = self.tracker.ui_base()
        mlflow = {"run": self.tracker.run_url(self.parent_id),
                  "version": f"{ui}/#/models/{self.profile.model_name}/versions/{version_number}" if version_number else "",
                  "note": "open it with `quantdag ui`" if ui == LOCAL_MLFLOW_UI else ""}
        return notes.run_summary(self.name, self.profile, self.base, checkpoint.uri if checkpoint else None,
                                 version_number, mlflow, self.prefect_note, self.code_version, cached, report)


def _present(store: ArtifactStore, version: Any) -> bool:
    """Whether a model version's checkpoint is still in ``store``; True for a version of another store."""
    if not str(version.source).startswith(store.root + "/"):
        return True
    ref = ArtifactRef(uri=version.source, sha256=version.tags.get("checkpoint_sha256", ""), kind="checkpoint", files={})
    return store.exists(ref)


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
