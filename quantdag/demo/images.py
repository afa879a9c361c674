"""PIL renderings of tables, charts and text pages, each with a question its pixels answer.

Each `draw_*` takes a `random.Random` and returns `(image, question, answer)`; the answer is
computed from the same values that were drawn. Widths and heights are drawn independently from
200-900 px, so aspect ratios and the processor's resized grids vary from sample to sample.
"""

from __future__ import annotations

import random
import textwrap
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from quantdag.demo import text

MIN_SIDE, MAX_SIDE = 200, 900
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
COLUMNS = "Revenue|Units|Cost|Visitors|Orders|Returns|Staff|Budget|Score|Stock".split("|")
SERIES = "Exports|Rainfall (mm)|Enrolment|Passengers|Output (t)|Sales".split("|")


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fitting_font(labels: list[str], max_width: float, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Return the largest font of at most `size` px (and at least 8) whose widest label is within `max_width`."""
    while size > 8 and max(_font(size).getlength(label) for label in labels) > max_width:
        size -= 1
    return _font(size)


def _size(rng: random.Random) -> tuple[int, int]:
    return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)


def draw_table(rng: random.Random) -> tuple[Image.Image, str, str]:
    """Draw a grid of numbers with row and column headers; about a fifth of the cells are empty ("-").

    The question asks for one cell, the row with the largest value in a column, or a column total
    (empty cells count as 0); values in a column are distinct, so the answer is unique.
    """
    width, height = _size(rng)
    n_rows, n_cols = rng.randint(3, 8), rng.randint(2, 5)
    columns = rng.sample(COLUMNS, n_cols)
    rows = rng.sample(text.CITIES, n_rows)
    full = [rng.sample(range(10, 1000), n_rows) for _ in range(n_cols)]  # distinct within a column
    values = [[full[c][r] if rng.random() > 0.2 else None for c in range(n_cols)] for r in range(n_rows)]
    c = rng.randrange(n_cols)  # the column the question is about gets at least one value
    if all(values[r][c] is None for r in range(n_rows)):
        values[0][c] = full[c][0]

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width / (n_cols + 1), height / (n_rows + 1)
    cells = [[row, *("-" if v is None else str(v) for v in vals)] for row, vals in zip(rows, values, strict=True)]
    labels = [["City", *columns], *cells]
    font = _fitting_font([label for line in labels for label in line], cell_w * 0.9, int(cell_h * 0.5))
    draw.rectangle([0, 0, width, cell_h], fill="#e8e8e8")
    for i in range(n_rows + 2):
        draw.line([(0, i * cell_h), (width, i * cell_h)], fill="black", width=1)
    for j in range(n_cols + 2):
        draw.line([(j * cell_w, 0), (j * cell_w, height)], fill="black", width=1)
    for i, line in enumerate(labels):
        for j, label in enumerate(line):
            draw.text(((j + 0.5) * cell_w, (i + 0.5) * cell_h), label, fill="black", font=font, anchor="mm")

    kind = rng.randrange(3)
    column = [values[r][c] for r in range(n_rows)]
    if kind == 0:
        r = rng.choice([r for r in range(n_rows) if column[r] is not None])
        return image, f"What is the {columns[c]} value for {rows[r]}?", str(column[r])
    if kind == 1:
        best = max(range(n_rows), key=lambda r: -1 if column[r] is None else column[r])
        return image, f"Which city has the highest {columns[c]}?", rows[best]
    total = sum(v for v in column if v is not None)
    return image, f"What is the total {columns[c]} over all cities? Treat '-' as 0.", str(total)


def draw_chart(rng: random.Random) -> tuple[Image.Image, str, str]:
    """Draw a bar or line chart of 3-8 yearly values with labelled points; the answer reasons step by step."""
    width, height = _size(rng)
    n = rng.randint(3, 8)
    start = rng.randint(1990, 2015)
    years = [str(start + i) for i in range(n)]
    values = rng.sample(range(5, 100), n)
    series = rng.choice(SERIES)
    color = rng.choice(PALETTE)
    bars = rng.random() < 0.5

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(max(8, min(height // 24, width // (6 * n))))
    left, right, top, bottom = width * 0.08, width * 0.97, height * 0.14, height * 0.86
    draw.text((width / 2, height * 0.06), f"{series} by year", fill="black", font=font, anchor="mm")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    step = (right - left) / n
    points = []
    for i, (year, value) in enumerate(zip(years, values, strict=True)):
        x = left + (i + 0.5) * step
        y = bottom - (bottom - top) * value / 100
        points.append((x, y))
        if bars:
            draw.rectangle([x - step * 0.35, y, x + step * 0.35, bottom], fill=color)
        draw.text((x, y - 2), str(value), fill="black", font=font, anchor="mb")
        draw.text((x, bottom + 4), year, fill="black", font=font, anchor="mt")
    if not bars:
        draw.line(points, fill=color, width=3)
        for x, y in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)

    listed = ", ".join(f"{y}: {v}" for y, v in zip(years, values, strict=True))
    hi, lo = max(range(n), key=values.__getitem__), min(range(n), key=values.__getitem__)
    if rng.random() < 0.5:
        question = f"In which year was {series} the highest?"
        steps = f"The largest value is {values[hi]}, in {years[hi]}. So the answer is {years[hi]}."
    else:
        question = f"What is the difference between the highest and the lowest {series}?"
        diff = values[hi] - values[lo]
        steps = (
            f"The highest is {values[hi]} and the lowest is {values[lo]}; "
            f"{values[hi]} - {values[lo]} = {diff}. So the answer is {diff}."
        )
    return image, question, f"The chart shows {listed}. {steps}"


def draw_page(rng: random.Random) -> tuple[Image.Image, str, str]:
    """Draw a wiki-style page: a title over 1-3 wrapped paragraphs (cut off where the page ends).

    The question asks for the title or for the kind of subject (river, village, lighthouse).
    """
    width, height = _size(rng)
    kind = rng.choice(text.PAGE_KINDS)
    title, paragraphs = text.wiki_article(rng, rng.randint(1, 3), [kind])
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    size = max(9, min(16, width // 40))
    margin = width * 0.05
    body, heading = _font(size), _fitting_font([title], width - 2 * margin, int(size * 1.6))
    draw.text((margin, margin), title, fill="black", font=heading)
    y = margin + size * 2.4
    draw.line([(margin, y - size * 0.4), (width - margin, y - size * 0.4)], fill="#a0a0a0", width=1)
    chars = max(10, int((width - 2 * margin) / (size * 0.55)))
    for paragraph in paragraphs:
        for line in textwrap.wrap(text.plain(paragraph), chars):
            if y > height - size * 1.5:
                break
            draw.text((margin, y), line, fill="black", font=body)
            y += size * 1.3
        y += size * 0.7
    if rng.random() < 0.5:
        return image, "What is the title of this article?", title
    return image, "What kind of place or structure does this article describe?", f"A {kind[0]}."


DRAWERS = {"sparsetables": draw_table, "plotqa_cot": draw_chart, "wiki_en": draw_page}
"""Nemotron-VLM-Dataset-v2 subset name -> renderer."""
