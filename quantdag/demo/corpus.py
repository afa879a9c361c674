"""Offline stand-ins for the calibration and evaluation data, in the real datasets' layouts.

* `write_image_text_mirror`: rows shaped like `nvidia/Nemotron-VLM-Dataset-v2` (subsets
  `sparsetables`, `plotqa_cot`, `wiki_en`): `<subset>/<subset>.jsonl` plus PNG images in
  `<subset>/media/shard_NNNNNN.tar`, joined by file name (the layout ModelOpt's loader reads).
* `write_text_mirror`: `.jsonl` records in the `abisee/cnn_dailymail` 3.0.0 schema.
* `write_eval_text`: WikiText-style raw text that shares no sentence with either mirror.

Every output is a pure function of its arguments (same seed, same bytes): PNGs are encoded with
fixed settings and tar members carry fixed metadata (mtime 0, owner root, mode 0644).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Sequence
from pathlib import Path

from quantdag.demo import images, text

IMAGE_TEXT_SUBSETS = ("sparsetables", "plotqa_cot", "wiki_en")


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}={value}: pass 1 or more")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    archive.addfile(info, io.BytesIO(data))


def write_image_text_mirror(
    root: str | Path,
    subsets: Sequence[str] = IMAGE_TEXT_SUBSETS,
    rows_per_subset: int = 16,
    seed: int = 0,
    rows_per_shard: int = 64,
) -> Path:
    """Write a Nemotron-VLM-Dataset-v2-layout mirror with rendered images and computed answers.

    Per subset: `<root>/<subset>/<subset>.jsonl`, one row per line:
    `{"id": str, "messages": [{"role": "user", "content": [{"type": "image", "image": "<n>.png"},
    {"type": "text", "text": question}]}, {"role": "assistant", "content": [{"type": "text",
    "text": answer}]}]}`, and `<root>/<subset>/media/shard_000000.tar`, ... holding the PNGs
    (`rows_per_shard` each, in row order). Images are RGB, 200-900 px per side: tables with numbers
    (`sparsetables`), bar/line charts with chain-of-thought answers (`plotqa_cot`), rendered text
    pages (`wiki_en`). About 10 ms per image on one core.

    Args:
        root: Mirror root; created if missing. Files of the named subsets are replaced.
        subsets: Subset names, each a key of `images.DRAWERS`.
        rows_per_subset: Rows (and images) per subset, >= 1.
        seed: Seed; each subset draws from its own stream, so adding a subset changes no other.
        rows_per_shard: Images per tar shard, >= 1.

    Returns:
        `root` as a `Path`.

    Raises:
        ValueError: If a subset is unknown or a count is < 1.
    """
    unknown = [s for s in subsets if s not in images.DRAWERS]
    if unknown or not subsets:
        raise ValueError(f"subsets={list(subsets)}: unknown {unknown}; choose from {sorted(images.DRAWERS)}")
    _positive("rows_per_subset", rows_per_subset)
    _positive("rows_per_shard", rows_per_shard)
    out = Path(root)
    for subset in subsets:
        rng = random.Random(f"image-text/{seed}/{subset}")
        media = out / subset / "media"
        media.mkdir(parents=True, exist_ok=True)
        for stale in media.glob("shard_*.tar"):
            stale.unlink()
        image_ids = rng.sample(range(100_000, 1_000_000), rows_per_subset)
        rows, archive = [], None
        for index, image_id in enumerate(image_ids):
            if index % rows_per_shard == 0:
                if archive is not None:
                    archive.close()
                shard = media / f"shard_{index // rows_per_shard:06d}.tar"
                archive = tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT)
            image, question, answer = images.DRAWERS[subset](rng)
            png = io.BytesIO()
            image.save(png, format="PNG", compress_level=1)
            file_name = f"{image_id}.png"
            _add_member(archive, file_name, png.getvalue())
            user = [{"type": "image", "image": file_name}, {"type": "text", "text": question}]
            assistant = [{"type": "text", "text": answer}]
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            rows.append({"id": f"{subset}_{image_id}", "messages": messages})
        archive.close()
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / subset / f"{subset}.jsonl").write_text(lines, encoding="utf-8")
    return out


def write_text_mirror(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` generated news records in the `abisee/cnn_dailymail` 3.0.0 schema as JSON lines.

    Each line: `{"article": str, "highlights": str, "id": str}`; articles run about 250-450 words
    in 6-9 paragraphs, ids are 40 hex digits as in the dataset.

    Args:
        path: Output `.jsonl` file; parent directories are created.
        n: Number of records, >= 1.
        seed: Seed.

    Returns:
        `path` as a `Path`.

    Raises:
        ValueError: If `n` < 1.
    """
    _positive("n", n)
    rng = random.Random(f"news/{seed}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(text.news_article(rng), ensure_ascii=False) + "\n" for _ in range(n))
    out.write_text(lines, encoding="utf-8")
    return out


def write_eval_text(path: str | Path, n_paragraphs: int, seed: int = 0) -> Path:
    r"""Write WikiText-style raw text for perplexity evaluation.

    Lines are ` = Title = ` headings, ` = = Section = = ` subheadings and paragraphs with
    WikiText's spacing (" , ", " @.@ "), one block per line.

    The subjects (moths, glaciers, ferns) and sentence templates are never used by the mirrors,
    so no sentence here appears in calibration data, whatever the seeds.

    Args:
        path: Output text file (UTF-8, "\\n" line ends); parent directories are created.
        n_paragraphs: Paragraphs in total, >= 1 (3-5 per article).
        seed: Seed.

    Returns:
        `path` as a `Path`.

    Raises:
        ValueError: If `n_paragraphs` < 1.
    """
    _positive("n_paragraphs", n_paragraphs)
    rng = random.Random(f"eval/{seed}")
    blocks, left = [], n_paragraphs
    while left:
        count = min(left, rng.randint(3, 5))
        title, paragraphs = text.wiki_article(rng, count, text.EVAL_KINDS)
        blocks.append(f" = {title} = ")
        for i, paragraph in enumerate(paragraphs):
            if i and rng.random() < 0.4:
                blocks.append(f" = = {rng.choice(['History', 'Description', 'Distribution', 'Surveys'])} = = ")
            blocks.append(f" {paragraph} ")
        left -= count
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(blocks) + "\n", encoding="utf-8")
    return out


def load_mirror_image(root: str | Path, subset: str, file_name: str):
    """Open one image of a mirror (or of a real Nemotron-VLM-Dataset-v2 download) by file name.

    Args:
        root: Dataset root holding `<subset>/media/shard_*.tar`.
        subset: Subset directory name, e.g. "plotqa_cot".
        file_name: The row's `image` entry, e.g. "292180.png".

    Returns:
        The decoded `PIL.Image.Image` (fully loaded; the archive is closed).

    Raises:
        ValueError: If no shard of the subset holds `file_name`.
    """
    from PIL import Image

    shards = sorted((Path(root) / subset / "media").glob("shard_*.tar"))
    for shard in shards:
        with tarfile.open(shard) as archive:
            try:
                member = archive.getmember(file_name)
            except KeyError:
                continue
            with archive.extractfile(member) as handle:
                image = Image.open(io.BytesIO(handle.read()))
                image.load()
                return image
    raise ValueError(f"{file_name!r} is in none of the {len(shards)} shards under {Path(root) / subset / 'media'}")
