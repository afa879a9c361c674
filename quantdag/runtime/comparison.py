"""The compare flow's record keeping: one MLflow parent run, a child per recipe, the comparison table and plot.

Kept out of ``flows/compare.py`` so the flow only wires steps. The parent run (``compare-<profile>``)
holds the shared steps (fetch, BF16 reference, calibration, merge) as children, as a quantize run
does; each recipe is a child of its own (run name = recipe name, params = the recipe, metrics =
its table row) whose own steps (hessian, weight_scales, export, audit, evaluate) are its children.
The table (markdown and JSON) and the quality-against-size plot are artifacts of the parent.
Nothing here computes a result; everything reads the small references that steps return.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conf.schema import Profile, RecipeSpec
from quantdag.evaluation.comparison import plot_quality_vs_size, recipe_row, table_markdown
from quantdag.model.loading import BaseRef
from quantdag.runtime.lineage import environment_tags
from quantdag.runtime.secrets import redact
from quantdag.runtime.store import ArtifactRef, ArtifactStore
from quantdag.runtime.tracking import Tracker, flatten, prefect_run_url

RECIPE_SECONDS = ("hessian", "weight_scales", "export")
"""Steps whose ``seconds`` make a recipe's own cost (the shared steps are paid once)."""
_ATTACH = {"export": ("hf_quant_config.json",), "evaluate": ("eval_report.json",), "audit": ("audit_report.json",)}


@dataclass
class ComparisonLineage:
    """MLflow records of one compare flow run."""

    profile: Profile
    recipes: list[RecipeSpec]
    base: BaseRef
    flow_run_id: str
    code_version: str
    tracker: Tracker = field(init=False)
    parent_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = Tracker(self.profile.tracking_uri)
        tags = {"base.model": self.base.repo_id or self.base.source_dir, "base.revision_sha": self.base.revision_sha or "local",
                "base.fingerprint": self.base.fingerprint, "profile": self.profile.name, "flow": "compare",
                "code_version": self.code_version, "recipes": ",".join(r.name for r in self.recipes), **environment_tags()}
        if url := prefect_run_url(self.flow_run_id):
            tags["prefect.flow_run_url"] = url
        params = flatten("", json.loads(self.profile.model_dump_json(exclude={"recipe"})))
        self.parent_id = self.tracker.parent(self.flow_run_id, f"compare-{self.profile.name}", tags, params)
        self.tracker.log_json(self.parent_id, "recipes.json", [json.loads(redact(r.model_dump_json())) for r in self.recipes])

    def _child(self, parent: str, name: str, future: Any, store: ArtifactStore) -> tuple[bool, ArtifactRef] | None:
        """Log one completed step under ``parent``; returns (cached, reference) or None when it did not complete."""
        if (result := _completed(future)) is None:
            return None
        cached, ref = result
        root = store.local_dir(ref)
        attach = [root / f for f in _ATTACH.get(name, ()) if (root / f).is_file()]
        self.tracker.child(parent, name, cached=cached, params={"artifact.uri": ref.uri, "artifact.sha256": ref.sha256},
                           metrics=ref.meta, artifacts=attach)
        return cached, ref

    def record(self, shared: dict[str, Any], per_recipe: dict[str, dict[str, Any]],
               store: ArtifactStore) -> tuple[dict[str, bool], list[dict[str, Any]]]:
        """Log the shared steps, a child per recipe with its steps, and return (cached, table rows).

        Args:
            shared: step name -> future of the shared steps.
            per_recipe: recipe name -> step name -> future (recipe steps, and the recipe's calls of
                the shared calibration and merge, cache hits after the first recipe).
            store: the artifact store the references point into.

        Returns:
            ``"<step>"`` / ``"<recipe>/<step>"`` -> whether it was a cache hit (completed steps only),
            and the table rows (:func:`quantdag.evaluation.comparison.recipe_row`) of the recipes
            whose evaluation completed.
        """
        cached = {name: done[0] for name, future in shared.items() if (done := self._child(self.parent_id, name, future, store))}
        rows = []
        for recipe in self.recipes:
            steps = per_recipe.get(recipe.name, {})
            done = {name: result for name, future in steps.items() if (result := _completed(future)) is not None}
            cached |= {f"{recipe.name}/{name}": hit for name, (hit, _) in done.items()}
            row = None
            if "evaluate" in done and "export" in done:
                seconds = sum(float(ref.meta.get("seconds", 0.0)) for name, (_, ref) in done.items() if name in RECIPE_SECONDS)
                row = recipe_row(recipe, {**done["export"][1].meta, **done["evaluate"][1].meta}, seconds)
                rows.append(row)
            child = self.tracker.child(self.parent_id, recipe.name, cached=all(hit for hit, _ in done.values()),
                                       params=flatten("recipe", json.loads(recipe.model_dump_json())),
                                       metrics={k: v for k, v in (row or {}).items() if isinstance(v, float)},
                                       tags={"quantdag.role": "recipe", "quantdag.recipe": recipe.name})
            for name, future in steps.items():
                self._child(child, name, future, store)
        return cached, rows

    def finish(self, rows: list[dict[str, Any]], bf16_perplexity: float | None, failed: bool = False) -> str:
        """Log the table (markdown, JSON) and the plot on the parent, end it; returns the markdown table."""
        markdown = table_markdown(rows, bf16_perplexity)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "comparison.md").write_text(markdown)
            (out / "comparison.json").write_text(json.dumps({"bf16_perplexity": bf16_perplexity, "rows": rows}, indent=1))
            files = [out / "comparison.md", out / "comparison.json"]
            if rows:
                files.append(plot_quality_vs_size(rows, out / "quality_vs_size.png", f"{self.profile.name}: quality against size"))
            for path in files:
                self.tracker.client.log_artifact(self.parent_id, str(path))
        self.tracker.finish(self.parent_id, "FAILED" if failed else "FINISHED")
        return markdown


def _completed(future: Any) -> tuple[bool, ArtifactRef] | None:
    state = future.state
    return (state.name == "Cached", future.result()) if state.is_completed() else None
