"""What people read about a quantize run: the MLflow run and model-version descriptions and the
Prefect run summary, as markdown with links between the two UIs.

Pure functions of the run's profile, resolved base and results; :mod:`quantdag.runtime.lineage`
writes them. Links inside MLflow are relative (``#/experiments/...``), so they work on whatever
host serves the UI (a tracking server, or ``quantdag ui`` over a SQLite store).
"""

from __future__ import annotations

from typing import Any

from conf.schema import Profile
from quantdag.model.loading import BaseRef
from quantdag.runtime.naming import recipe_summary


def base_summary(base: BaseRef) -> str:
    """``Qwen/Qwen3.6-27B@1a2b3c4`` (a Hub base at the commit loaded) or ``<dir> (local, fingerprint 1a2b3c4)``."""
    if base.repo_id:
        return f"`{base.repo_id}@{(base.revision_sha or base.revision)[:12]}` (revision `{base.revision}`)"
    gguf = f" GGUF `{base.gguf_file}`" if base.gguf_file else ""
    return f"`{base.source_dir}`{gguf} (local, fingerprint `{base.fingerprint[:12]}`)"


def _source(path: str | None, repo_id: str | None, revision: str) -> str:
    return f"`{path}`" if path else f"`{repo_id}@{revision}`"


def data_summary(profile: Profile) -> str:
    """Calibration and evaluation data of ``profile`` in one line (sources, rows, tokens)."""
    text = profile.text
    parts = [f"calibration text {_source(text.path, text.repo_id, text.revision)}: {text.num_samples} rows x "
             f"{text.seq_len} tokens"]
    if profile.image_text is not None:
        image = profile.image_text
        parts.append(f"calibration image-text {_source(image.path, image.repo_id, image.revision)} "
                     f"({', '.join(image.subsets)}): {image.num_samples} rows")
    spec = profile.eval
    held = f" + {spec.image_text_samples} held-out image-text rows" if spec.image_text_samples else ""
    parts.append(f"evaluation {_source(spec.path, spec.repo_id, spec.split)}: {spec.max_windows} windows x "
                 f"{spec.seq_len} tokens{held}")
    return "; ".join(parts)


def prefect_line(url: str | None, note: str, name: str) -> str:
    """Markdown for the Prefect flow run: a link when there is a URL, and the note (how to open it)."""
    link = f"[{name}]({url})" if url else f"`{name}`"
    return f"{link} ({note})" if note else link


def metrics_line(metrics: dict[str, Any]) -> str:
    """Key metrics of an evaluation against BF16, in one line (missing ones left out)."""
    shown = [("perplexity BF16", "perplexity_bf16"), ("NVFP4", "perplexity_nvfp4"), ("ratio", "perplexity_ratio"),
             ("mean KL", "kl_mean"), ("top-1 agreement", "top1_agreement"), ("bits/parameter", "bits_per_parameter"),
             ("size vs BF16", "size_ratio_vs_bf16")]
    return ", ".join(f"{label} {metrics[key]:.4g}" for label, key in shown if isinstance(metrics.get(key), int | float))


def parent_description(run_name: str, profile: Profile, base: BaseRef, prefect: str,
                       version: tuple[str, str] | None = None, metrics: dict[str, Any] | None = None) -> str:
    """Markdown description of a quantize run's MLflow parent run.

    Args:
        run_name: the run's name (the Prefect flow run's and the MLflow run's).
        prefect: :func:`prefect_line` of the flow run.
        version: ``(model name, version number)`` once registered.
        metrics: the evaluation's metrics once known.
    """
    lines = [f"**{run_name}**: quantize profile `{profile.name}`", "",
             f"- **Prefect flow run**: {prefect}",
             f"- **Base**: {base_summary(base)}",
             f"- **Recipe**: {recipe_summary(profile.recipe)}",
             f"- **Data**: {data_summary(profile)}"]
    if metrics:
        lines.append(f"- **NVFP4 vs BF16**: {metrics_line(metrics)}")
    if version:
        name, number = version
        lines.append(f"- **Registered model**: [{name} version {number}](#/models/{name}/versions/{number})")
    return "\n".join(lines) + "\n"


def version_header(profile: Profile, base: BaseRef, checkpoint: Any, audit_meta: dict[str, Any],
                   metrics: dict[str, Any], links: dict[str, str]) -> dict[str, str]:
    """Label -> markdown of a model version's description (see ``quantdag.runtime.registry.version_description``).

    Args:
        checkpoint: the registered ``ArtifactRef`` (``uri``, ``sha256``).
        audit_meta: the passed audit report's ``meta`` (``counts`` of what it checked).
        metrics: the evaluation's metrics.
        links: ``mlflow_run`` and ``prefect`` (markdown), ``audit_report``, ``eval_report`` (relative links or "").
    """
    counts = audit_meta.get("counts") or {}
    checked = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items())
    audit = f"passed ({checked})" if checked else "passed"
    if links.get("audit_report"):
        audit += f", [audit report]({links['audit_report']})"
    bits = metrics.get("bits_per_parameter")
    size = f", {bits:.3g} bits per parameter" if isinstance(bits, int | float) else ""
    header = {
        "Recipe": recipe_summary(profile.recipe),
        "Base": base_summary(base),
        "Data": data_summary(profile),
        "Checkpoint": f"`{checkpoint.uri}` (sha256 `{checkpoint.sha256[:12]}`{size})",
        "Audit": audit,
        "NVFP4 vs BF16 (latest run)": metrics_line(metrics) or "not evaluated",
        "Made by": f"[MLflow run]({links['mlflow_run']}), Prefect flow run {links['prefect']}",
        "Deploy": f"`@candidate` points at the newest audited version; promote this one with "
                  f"`quantdag promote {profile.model_name} <version>` (alias `@champion`)",
    }
    if links.get("eval_report"):
        header["NVFP4 vs BF16 (latest run)"] += f", [eval report]({links['eval_report']})"
    return header


def run_summary(run_name: str, profile: Profile, base: BaseRef, checkpoint_uri: str | None, version: str | None,
                mlflow: dict[str, str], prefect_note: str, code_version: str, cached: dict[str, bool],
                metrics: dict[str, Any]) -> str:
    """The Prefect markdown artifact of a quantize run: checkpoint, model version and MLflow links, steps, metrics.

    Args:
        mlflow: ``run`` (absolute URL of the parent run), ``version`` (absolute URL of the model
            version page, or ""), ``note`` (how to open a local UI, or "").
        prefect_note: :func:`prefect_line`'s note of this run, or "".
    """
    model = f"`{profile.model_name}` version {version}" if version else f"`{profile.model_name}`: not registered"
    if version and mlflow.get("version"):
        model = f"[{profile.model_name} version {version}]({mlflow['version']}) (alias `@candidate`)"
    note = f" ({mlflow['note']})" if mlflow.get("note") else ""
    lines = [f"# {run_name}", "",
             f"- base: {base_summary(base)}",
             f"- recipe: {recipe_summary(profile.recipe)}",
             f"- checkpoint: `{checkpoint_uri or 'not produced'}`",
             f"- registered model: {model}",
             f"- MLflow parent run: [{run_name}]({mlflow['run']}){note}",
             f"- code version: `{code_version}`"]
    if prefect_note:
        lines.append(f"- Prefect: {prefect_note}")
    lines += ["", "| step | cached |", "|---|---|"] + [f"| {step} | {'yes' if hit else 'no'} |" for step, hit in cached.items()]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return "\n".join(lines) + "\n"
