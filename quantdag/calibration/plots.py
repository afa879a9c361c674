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
    """Write a PNG: per input quantizer (x, in layer order), each modality's amax (log y) and the merged one.

    Args:
        table: rows from :func:`tasks.merge.amax_table` (``quantizer``, one key per label, ``merged``).
        labels: the calibration state labels (``image_text``, ``text`` or shard labels ``text[0]``...).
        path: PNG file to write.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table, key=lambda r: (int(m.group(1)) if (m := _LAYER.search(r["quantizer"])) else -1, r["quantizer"]))
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(modality(label), []).append(label)
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.12), 4.5), dpi=100)
    x = range(len(rows))
    for name, members in groups.items():
        ax.plot(x, [max(r[m] for m in members) for r in rows], marker=".", linestyle="", label=f"{name} amax")
    ax.plot(x, [r["merged"] for r in rows], linewidth=0.8, color="black", alpha=0.6, label="merged (max)")
    ax.set_yscale("log")
    ax.set_xlabel("input quantizer (layer order)")
    ax.set_ylabel("amax")
    counts = ", ".join(f"{n}: {sum(1 for r in rows if modality(r['source'] or '') == n)}" for n in groups)
    ax.set_title(f"Input amax by calibration modality (set the merged max: {counts})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
