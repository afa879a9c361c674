"""Plots for reports: which calibration modality set each input quantizer's amax."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"layers\.(\d+)\.")


def modality(label: str) -> str:
    """``text[3]`` -> ``text`` (shard labels grouped by their branch)."""
    return label.split("[", 1)[0]


def plot_amax_by_modality(table: list[dict[str, Any]], labels: list[str], path: Path) -> Path:
    """Write :func:`amax_figure` of ``table`` as a PNG.

    Args:
        table: rows from :func:`tasks.merge.amax_table` (``quantizer``, one key per label, ``merged``).
        labels: the calibration state labels (``image_text``, ``text`` or shard labels ``text[0]``...).
        path: PNG file to write.

    Returns:
        ``path``.
    """
    import matplotlib.pyplot as plt

    fig = amax_figure(table, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def amax_figure(table: list[dict[str, Any]], labels: list[str]) -> Any:
    """Per input quantizer (x, in layer order), each calibration set's amax (log y) and the merged one.

    The legend sits outside the axes, to their right, so it covers no point; the title says how
    many quantizers took their merged amax from each calibration set.

    Args:
        table: rows from :func:`tasks.merge.amax_table`, as in :func:`plot_amax_by_modality`.
        labels: the calibration state labels (shards of one branch are drawn as that branch).

    Returns:
        The matplotlib ``Figure`` (Agg backend); close it with ``matplotlib.pyplot.close``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table, key=lambda r: (int(m.group(1)) if (m := _LAYER.search(r["quantizer"])) else -1, r["quantizer"]))
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(modality(label), []).append(label)
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.12) + 2.5, 4.8), dpi=100)
    x = range(len(rows))
    for name, members in groups.items():
        ax.plot(x, [max(r[m] for m in members) for r in rows], marker=".", linestyle="",
                label=f"{name.replace('_', '-')} calibration")
    ax.plot(x, [r["merged"] for r in rows], linewidth=0.8, color="black", alpha=0.6, label="merged amax (max over sets)")
    ax.set_yscale("log")
    ax.set_xlabel("input quantizer, in layer order")
    ax.set_ylabel("activation amax (log scale)")
    counts = ", ".join(f"{n.replace('_', '-')} {sum(1 for r in rows if modality(r['source'] or '') == n)}" for n in groups)
    ax.set_title(f"Activation amax of each input quantizer, per calibration set\n"
                 f"quantizers whose merged amax came from each set: {counts} (of {len(rows)})", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9)
    fig.tight_layout()
    return fig
