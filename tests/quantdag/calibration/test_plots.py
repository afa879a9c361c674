"""The per-layer amax plot: its legend covers no point, its title says what it shows."""

from __future__ import annotations

from pathlib import Path

from quantdag.calibration.plots import amax_figure, plot_amax_by_modality


def _table(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):  # amax in every corner of the plot, as real layers give
        image, text = (100.0, 0.01) if i % 2 else (0.01, 100.0)
        rows.append({"quantizer": f"model.layers.{i // 4}.mlp.q{i % 4}.input_quantizer", "image_text": image,
                     "text": text, "merged": max(image, text), "source": "image_text" if image > text else "text"})
    return rows


def test_legend_lies_outside_the_axes_and_the_title_counts_the_sources(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = amax_figure(_table(), ["image_text", "text"])
    try:
        fig.canvas.draw()
        (ax,) = fig.axes
        renderer = fig.canvas.get_renderer()
        legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert not legend.overlaps(axes), f"the legend {legend} covers the plotted area {axes}"
        assert fig.bbox.contains(legend.x1 - 1, legend.y1 - 1), "the legend is cut off the image"
        title = ax.get_title()
        assert "image-text 20, text 20 (of 40)" in title and "input quantizer" in title, title
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "image-text calibration", "text calibration", "merged amax (max over sets)"]
    finally:
        plt.close(fig)
    shards = [{**row, "text[0]": row["text"], "text[1]": row["image_text"]} for row in _table(8)]
    assert plot_amax_by_modality(shards, ["text[0]", "text[1]"], tmp_path / "p.png").stat().st_size > 0
