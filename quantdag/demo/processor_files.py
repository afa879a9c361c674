"""Processor and generation files of a Qwen3.5 VLM checkpoint, as JSON the release also ships.

Written by hand rather than by `Qwen3VLProcessor.save_pretrained`, whose layout changes across
transformers versions (5.x folds the sub-processors into `processor_config.json`); the split
files below load in 4.57 and 5.x alike. `AutoProcessor.from_pretrained` on the directory returns
a `Qwen3VLProcessor` whose image processor is `Qwen2VLImageProcessor` (torchvision backend) and
whose video processor is `Qwen3VLVideoProcessor` (needs torchvision).

Image resizing (Qwen2-VL "smart resize"): each side is rounded to a multiple of
`patch_size * merge_size` (32 px) and the area is kept within [`shortest_edge`, `longest_edge`]
pixels, so a H x W image becomes a (1, H/16, W/16) grid of 16 px patches and
H/32 * W/32 `<|image_pad|>` tokens. The release's bounds are 65,536 (256 x 256) and 16,777,216
pixels: images smaller than 256 x 256 are upscaled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from quantdag.demo import tokenizer as tok

if TYPE_CHECKING:
    from quantdag.demo.dims import Qwen35Dims

IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]
IMAGE_MIN_PIXELS = 65_536
IMAGE_MAX_PIXELS = 16_777_216
VIDEO_MIN_PIXELS = 4_096
VIDEO_MAX_PIXELS = 25_165_824
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_processor_files(out_dir: Path, dims: Qwen35Dims) -> list[Path]:
    """Write `preprocessor_config.json`, `video_preprocessor_config.json` and `processor_config.json`.

    Args:
        out_dir: Checkpoint directory (must exist).
        dims: Supplies `patch_size`, `temporal_patch_size` and `spatial_merge_size`, which must
            agree with the vision tower or the processor emits the wrong number of patches.

    Returns:
        The three paths written.
    """
    geometry = {
        "patch_size": dims.patch_size,
        "temporal_patch_size": dims.temporal_patch_size,
        "merge_size": dims.spatial_merge_size,
    }
    common = {
        "do_resize": True,
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_convert_rgb": True,
        **geometry,
        "processor_class": "Qwen3VLProcessor",
    }
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
        **common,
    }
    video = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "do_sample_frames": True,
        **common,
    }
    paths = [out_dir / "preprocessor_config.json", out_dir / "video_preprocessor_config.json"]
    _write_json(paths[0], image)
    _write_json(paths[1], video)
    paths.append(out_dir / "processor_config.json")
    _write_json(paths[2], {"processor_class": "Qwen3VLProcessor"})
    return paths


def write_generation_config(out_dir: Path) -> Path:
    """Write `generation_config.json`.

    Stops on `<|im_end|>` or `<|endoftext|>`, pads with `<|endoftext|>`, and samples as Qwen3
    recommends (temperature 0.6, top-p 0.95, top-k 20).

    Returns:
        The path written.
    """
    path = out_dir / "generation_config.json"
    _write_json(
        path,
        {
            "bos_token_id": tok.ENDOFTEXT_ID,
            "eos_token_id": [tok.IM_END_ID, tok.ENDOFTEXT_ID],
            "pad_token_id": tok.ENDOFTEXT_ID,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": 20,
        },
    )
    return path
