"""The MLflow model registry side of a quantize run: one model version per checkpoint, described.

A checkpoint is content-addressed (its sha256), so it is registered once: a later run that
produces the same bytes (an all-cached rerun, a run that changed only evaluation settings)
reuses its version and adds what it measured. Each version:

- points at the checkpoint (``source``: the artifact store URI) and at an MLflow logged model
  (MLflow 3's model entity, created once per checkpoint, its id in the version tag
  :data:`LOGGED_MODEL_TAG`); every run that produces the checkpoint logs that logged model as an
  output, so the run's page lists the registered version under "Registered models";
- carries tags: the base's identity, the checkpoint and audit sha256, the audit verdict, the key
  metrics of the latest evaluation, and one ``eval.<report sha12>`` tag per distinct evaluation
  (the metrics, the MLflow run and the Prefect run that measured them);
- has a markdown description rebuilt from those tags (:func:`version_description`): recipe, base,
  data, metrics against BF16, bits per parameter, the audit verdict and links;
- gets the alias :data:`CANDIDATE` once its audit passed (registration requires one);
  :func:`promote` moves :data:`CHAMPION` to it (``quantdag promote <model> <version>``).

A version whose checkpoint is gone from its store (the store was deleted) is tagged
``checkpoint_status=missing`` and loses its aliases (:func:`mark_missing`); a run that produces
the same bytes again marks it ``present`` (the aliases stay off: promote again deliberately).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quantdag.runtime.secrets import redact

CANDIDATE = "candidate"
"""Alias of the newest version whose audit passed (set by every registering run)."""
CHAMPION = "champion"
"""Alias a person moves to the version to deploy (:func:`promote`)."""
LOGGED_MODEL_TAG = "quantdag.logged_model_id"
STATUS_TAG = "checkpoint_status"
KEY_METRICS = ("perplexity_bf16", "perplexity_nvfp4", "perplexity_ratio", "kl_mean", "top1_agreement",
               "bits_per_parameter", "size_ratio_vs_bf16", "checkpoint_bytes")
"""Evaluation metrics copied to a version (tags, logged-model metrics, description), NVFP4 against BF16."""
_EVAL_PREFIX = "eval."
_SHOWN_EVALUATIONS = 20
"""Rows of the description's evaluation table (the newest; MLflow keeps descriptions short)."""


@dataclass(frozen=True)
class Version:
    """A registered checkpoint: ``name`` version ``number``, its logged model, and whether this run created it."""

    name: str
    number: str
    model_id: str
    created: bool


def register_checkpoint(client: MlflowClient, experiment_id: str, run_id: str, name: str, source: str,
                        tags: dict[str, str]) -> Version:
    """Find or create the version of the checkpoint ``tags["checkpoint_sha256"]`` and link it to ``run_id``.

    Args:
        client: MLflow client of the tracking server (or SQLite store).
        experiment_id: experiment of the logged model.
        run_id: the quantize run's MLflow parent run (source run of a new version; gets the
            logged model as an output either way).
        name: registered model name (created when missing).
        source: the checkpoint's URI in the artifact store.
        tags: version tags; ``checkpoint_sha256`` (the checkpoint's content address) finds an
            existing version of the same bytes; without it a new version is always made.

    Returns:
        The :class:`Version`.

    Raises:
        MlflowException: the registry refused (e.g. a local ``source`` with an MLflow server:
            use an ``s3://`` artifact store).
    """
    sha = tags.get("checkpoint_sha256") or ""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=(
            f"NVFP4 checkpoints made by quantdag (profile `{name}`), one version per distinct checkpoint. "
            f"`@{CANDIDATE}`: the newest audited version; `@{CHAMPION}`: the promoted one."))
    existing = [v for v in client.search_model_versions(f"name='{name}'") if sha and v.tags.get("checkpoint_sha256") == sha]
    if existing:
        version = min(existing, key=lambda v: int(v.version))
        model_id = version.tags.get(LOGGED_MODEL_TAG) or _logged_model(client, experiment_id, run_id, name, sha)
        client.set_model_version_tag(name, version.version, LOGGED_MODEL_TAG, model_id)
        number, created = str(version.version), False
    else:
        model_id = _logged_model(client, experiment_id, run_id, name, sha)
        safe = {key: redact(str(value)) for key, value in {**tags, LOGGED_MODEL_TAG: model_id}.items()}
        number = str(client.create_model_version(name, source, run_id=run_id, tags=safe, model_id=model_id).version)
        created = True
    client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)])
    return Version(name, number, model_id, created)


def _logged_model(client: MlflowClient, experiment_id: str, run_id: str, name: str, sha: str) -> str:
    """Create the checkpoint's logged model (named like the registered model, with the characters a
    logged model name may not hold, ``/ : . % " '``, as ``-``); returns its id."""
    name = re.sub(r"[/:.%\"']", "-", name)
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                       tags={"checkpoint_sha256": sha}, model_type="nvfp4-checkpoint")
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def record_evaluation(client: MlflowClient, version: Version, run_id: str, report_sha256: str,
                      metrics: dict[str, Any], links: dict[str, str]) -> None:
    """Add one evaluation of the version's checkpoint: key metrics as version tags (latest wins),
    as metrics of its logged model (logged on ``run_id``), and an ``eval.<report sha12>`` tag.

    Args:
        version: from :func:`register_checkpoint`.
        run_id: the MLflow parent run that evaluated it.
        report_sha256: the ``eval-report`` artifact's sha256 (one tag per distinct report).
        metrics: the report's metrics (:data:`KEY_METRICS` are kept; non-numbers dropped).
        links: ``mlflow_run`` (relative MLflow UI link), ``prefect_run`` (URL or ""), ``eval_report``.
    """
    kept = {k: float(metrics[k]) for k in KEY_METRICS if isinstance(metrics.get(k), int | float)}
    for key, value in kept.items():
        client.set_model_version_tag(version.name, version.number, key, f"{value:.6g}")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=version.model_id) for k, v in kept.items()])
    entry = {"metrics": {k: round(v, 6) for k, v in kept.items()}, "run_id": run_id, "time": now, **links}
    client.set_model_version_tag(version.name, version.number, f"{_EVAL_PREFIX}{report_sha256[:12]}",
                                 redact(json.dumps(entry, sort_keys=True)))


def evaluations(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The ``eval.*`` entries of a version's tags, oldest first (malformed ones skipped)."""
    found = []
    for key, value in tags.items():
        if key.startswith(_EVAL_PREFIX):
            try:
                found.append({"report": key.removeprefix(_EVAL_PREFIX), **json.loads(value)})
            except (ValueError, TypeError):
                continue
    return sorted(found, key=lambda entry: entry.get("time", 0))


def version_description(header: dict[str, str], tags: dict[str, str]) -> str:
    """Markdown description of a version: ``header`` lines, then one row per evaluation.

    Args:
        header: label -> markdown value, in order (``Recipe``, ``Base``, ``Data``, ``Audit``...).
        tags: the version's tags (its ``eval.*`` entries make the table; :func:`record_evaluation`).

    Returns:
        The description (MLflow renders it on the model version page).
    """
    lines = [f"- **{label}**: {value}" for label, value in header.items()]
    rows = evaluations(tags)
    earlier, rows = len(rows[:-_SHOWN_EVALUATIONS]), rows[-_SHOWN_EVALUATIONS:]
    if rows:
        columns = [k for k in KEY_METRICS if any(k in row["metrics"] for row in rows)]
        lines += ["", "**Evaluations** (NVFP4 against the BF16 base, same held-out data)", "",
                  "| " + " | ".join(["run", *columns, "report"]) + " |", "|" + "---|" * (len(columns) + 2)]
        for row in rows:
            run = f"[MLflow]({row['mlflow_run']})" + (f" [Prefect]({row['prefect_run']})" if row.get("prefect_run") else "")
            cells = [f"{row['metrics'][k]:.4g}" if k in row["metrics"] else "-" for k in columns]
            report = f"[eval report]({row['eval_report']})" if row.get("eval_report") else row["report"]
            lines.append("| " + " | ".join([run, *cells, report]) + " |")
        if earlier:
            lines += ["", f"{earlier} earlier evaluations: the version's `eval.*` tags"]
    return "\n".join(lines) + "\n"


def describe(client: MlflowClient, version: Version, header: dict[str, str]) -> str:
    """Rewrite the version's description from ``header`` and its tags; returns it."""
    tags = client.get_model_version(version.name, version.number).tags
    text = redact(version_description(header, tags))
    client.update_model_version(version.name, version.number, description=text)
    return text


def set_candidate(client: MlflowClient, version: Version) -> None:
    """Point :data:`CANDIDATE` at ``version`` and mark its checkpoint present (its audit passed: it was registered)."""
    client.set_model_version_tag(version.name, version.number, STATUS_TAG, "present")
    client.set_registered_model_alias(version.name, CANDIDATE, version.number)


def promote(client: MlflowClient, name: str, number: str, alias: str = CHAMPION) -> str:
    """Point ``alias`` (default :data:`CHAMPION`) at version ``number`` of ``name``; returns the version.

    Raises:
        ValueError: the version's checkpoint is marked missing or it has no passed audit tag.
        MlflowException: no such model or version.
    """
    version = client.get_model_version(name, str(number))
    if version.tags.get(STATUS_TAG) == "missing":
        raise ValueError(f"{name} version {number}: its checkpoint {version.source} is missing from the store; "
                         "rerun the profile to rebuild it, then promote")
    if version.tags.get("audit") != "passed":
        raise ValueError(f"{name} version {number} has no passed audit (tag audit={version.tags.get('audit')!r}); "
                         "promote a version that a quantize run registered")
    client.set_registered_model_alias(name, alias, str(number))
    return str(number)


def mark_missing(client: MlflowClient, name: str, exists: Callable[[Any], bool]) -> list[str]:
    """Tag every version of ``name`` whose checkpoint ``exists(version)`` denies as missing and drop its aliases.

    Args:
        exists: ``version -> bool`` (reads the artifact store; a version it raises ``OSError``
            for is left as it is).

    Returns:
        The version numbers marked missing by this call.
    """
    marked = []
    aliases = client.get_registered_model(name).aliases if client.search_registered_models(f"name='{name}'") else {}
    for version in client.search_model_versions(f"name='{name}'"):
        if version.tags.get(STATUS_TAG) == "missing":
            continue
        try:
            present = exists(version)
        except OSError:
            continue
        if present:
            continue
        client.set_model_version_tag(name, version.version, STATUS_TAG, "missing")
        for alias in [alias for alias, number in aliases.items() if str(number) == str(version.version)]:
            client.delete_registered_model_alias(name, alias)  # search results carry no aliases: read the model's
        marked.append(str(version.version))
    return marked
