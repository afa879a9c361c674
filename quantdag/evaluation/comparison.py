"""A table and a plot that compare recipes by quality against size.

One row per recipe from its evaluation metrics (``tasks/evaluate.py``'s ``eval-report`` meta):
perplexity and its increase over BF16, mean token KL(BF16 || quantized) in nats, top-1
agreement, checkpoint bits per parameter and bytes, and the seconds the recipe's own steps took
(weight scales, Hessians, export: the shared fetch, calibration and reference are paid once).
The plot puts quality (perplexity increase, %) against size (bits per parameter), one labelled
point per recipe: the recipes on the lower-left front are the ones worth their bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conf.recipe import RecipeSpec

COLUMNS = ("recipe", "formats", "weight_scale", "perplexity", "delta_perplexity_pct", "kl_mean", "top1_agreement",
           "bits_per_parameter", "checkpoint_bytes", "seconds")
"""Keys of a row (:func:`recipe_row`), in table order."""


def formats_label(recipe: RecipeSpec) -> str:
    """``mlp/attention/linear_attention[/lm_head]`` formats, e.g. ``nvfp4/fp8/fp8`` (lm_head shown when not bf16)."""
    formats = recipe.formats
    parts = [formats.mlp, formats.attention, formats.linear_attention]
    return "/".join(parts + ([f"lm_head {formats.lm_head}"] if formats.lm_head != "bf16" else []))


def recipe_row(recipe: RecipeSpec, evaluation: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One table row.

    Args:
        recipe: the recipe.
        evaluation: the evaluation metrics (``perplexity_bf16``, ``perplexity_nvfp4``, ``kl_mean``,
            ``top1_agreement``, ``bits_per_parameter``, ``checkpoint_bytes``).
        seconds: wall seconds of the recipe's own steps.

    Returns:
        A dict with the keys of :data:`COLUMNS`.

    Raises:
        KeyError: a metric is missing from ``evaluation``.
    """
    return {
        "recipe": recipe.name,
        "formats": formats_label(recipe),
        "weight_scale": recipe.weight_scale,
        "perplexity": float(evaluation["perplexity_nvfp4"]),
        "delta_perplexity_pct": 100.0 * (float(evaluation["perplexity_nvfp4"]) / float(evaluation["perplexity_bf16"]) - 1.0),
        "kl_mean": float(evaluation["kl_mean"]),
        "top1_agreement": float(evaluation["top1_agreement"]),
        "bits_per_parameter": float(evaluation["bits_per_parameter"]),
        "checkpoint_bytes": float(evaluation["checkpoint_bytes"]),
        "seconds": float(seconds),
    }


def table_markdown(rows: list[dict[str, Any]], bf16_perplexity: float | None = None) -> str:
    """A markdown table of ``rows`` (:func:`recipe_row`), BF16 first when its perplexity is given."""
    lines = ["| recipe | formats (mlp/attn/lin-attn) | weight scales | perplexity | Δppl vs BF16 | mean KL (nats) "
             "| top-1 agree | bits/param | bytes | seconds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    if bf16_perplexity is not None:
        lines.append(f"| BF16 | - | - | {bf16_perplexity:.3f} | 0 | 0 | 1 | 16.00 | - | - |")
    lines += [f"| {r['recipe']} | {r['formats']} | {r['weight_scale']} | {r['perplexity']:.3f} | "
              f"{r['delta_perplexity_pct']:+.2f}% | {r['kl_mean']:.4f} | {r['top1_agreement']:.4f} | "
              f"{r['bits_per_parameter']:.2f} | {r['checkpoint_bytes']:,.0f} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_quality_vs_size(rows: list[dict[str, Any]], path: Path, title: str = "quality against size") -> Path:
    """Write a PNG: perplexity increase over BF16 (%) against bits per parameter, one labelled point per recipe.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for row in rows:
        ax.scatter(row["bits_per_parameter"], row["delta_perplexity_pct"], s=30)
        ax.annotate(row["recipe"], (row["bits_per_parameter"], row["delta_perplexity_pct"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("checkpoint bits per parameter")
    ax.set_ylabel("perplexity increase over BF16 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
