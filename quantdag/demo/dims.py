"""Widths and transformers config of a Qwen3.5-architecture VLM (`model_type` `qwen3_5`).

`Qwen35Dims` holds every width the architecture needs; its defaults describe a model small enough
to calibrate and export on two CPU cores in seconds, with the real 248,320-row vocabulary and the
real special-token ids, so the real tokenizer and processor drive it. `Qwen35Dims.qwen3_6_27b`
gives Qwen/Qwen3.6-27B's widths with fewer decoder layers (the release has 64). `qwen3_5_config`
turns the widths into the `Qwen3_5Config` that `quantdag.demo.tiny_model` and
`quantdag.demo.weights` build tensors from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from conf.base import FrozenModel
from quantdag.demo import tokenizer as tok

if TYPE_CHECKING:
    import torch
    from transformers import Qwen3_5Config

NVFP4_GROUP = 16
"""NVFP4 block size: one FP8 scale per 16 weights along a Linear's input dimension."""


class Qwen35Dims(FrozenModel):
    """Widths of a Qwen3.5-architecture VLM (`model_type` `qwen3_5`).

    Defaults: a tiny model (hidden 128, 4 decoder layers = 3 Gated-DeltaNet linear-attention +
    1 gated full-attention, a 2-block vision tower 64 wide) with the real vocabulary and token ids.
    Every Linear's input width is a multiple of 16 so NVFP4's 16-element blocks tile it.
    Field names follow `Qwen3_5TextConfig` / `Qwen3_5VisionConfig` (vision fields prefixed `vision_`).
    Frozen; unknown fields are rejected.
    """

    vocab_size: int = Field(tok.MODEL_VOCAB_SIZE, ge=tok.VIDEO_PAD_ID + 1)
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    full_attention_interval: int = Field(4, gt=0, description="every n-th layer is full attention")
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int = Field(64, gt=0)
    partial_rotary_factor: float = Field(0.25, gt=0, le=1)
    rope_theta: float = Field(10_000_000.0, gt=0)
    max_position_embeddings: int = Field(262_144, gt=0)
    rms_norm_eps: float = Field(1e-6, gt=0)
    linear_num_key_heads: int = Field(2, gt=0)
    linear_num_value_heads: int = Field(6, gt=0)
    linear_key_head_dim: int = Field(32, gt=0)
    linear_value_head_dim: int = Field(32, gt=0)
    linear_conv_kernel_dim: int = Field(4, gt=0)
    mtp_num_hidden_layers: int = Field(1, ge=0)
    vision_depth: int = Field(2, gt=0)
    vision_hidden_size: int = Field(64, gt=0)
    vision_intermediate_size: int = Field(256, gt=0)
    vision_num_heads: int = Field(4, gt=0)
    vision_out_hidden_size: int = Field(128, gt=0, description="must equal hidden_size")
    vision_num_position_embeddings: int = Field(2304, gt=0, description="a square: 48 x 48 grid")
    patch_size: int = Field(16, gt=0, description="pixels per patch side")
    spatial_merge_size: int = Field(2, gt=0, description="patches per merged token side")
    temporal_patch_size: int = Field(2, gt=0, description="frames per patch (an image is repeated)")

    @model_validator(mode="after")
    def _check(self) -> Qwen35Dims:
        problems = []
        linear_inputs = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads * head_dim": self.num_attention_heads * self.head_dim,
            "linear_num_value_heads * linear_value_head_dim": self.linear_num_value_heads * self.linear_value_head_dim,
            "vision_hidden_size": self.vision_hidden_size,
            "vision_intermediate_size": self.vision_intermediate_size,
        }
        problems += [
            f"{name}={value} is not a multiple of {NVFP4_GROUP} (a Linear's input width)"
            for name, value in linear_inputs.items()
            if value % NVFP4_GROUP
        ]
        ratios = {
            ("num_attention_heads", "num_key_value_heads"): (self.num_attention_heads, self.num_key_value_heads),
            ("linear_num_value_heads", "linear_num_key_heads"): (
                self.linear_num_value_heads,
                self.linear_num_key_heads,
            ),
            ("vision_hidden_size", "vision_num_heads"): (self.vision_hidden_size, self.vision_num_heads),
        }
        problems += [f"{a}={x} is not divisible by {b}={y}" for (a, b), (x, y) in ratios.items() if x % y]
        if self.vision_out_hidden_size != self.hidden_size:
            problems.append(f"vision_out_hidden_size={self.vision_out_hidden_size} must equal hidden_size")
        if round(self.vision_num_position_embeddings**0.5) ** 2 != self.vision_num_position_embeddings:
            problems.append(f"vision_num_position_embeddings={self.vision_num_position_embeddings} is not a square")
        if self.rotary_dim < 6 or self.rotary_dim % 2:
            problems.append(
                f"head_dim * partial_rotary_factor = {self.rotary_dim}: need an even count >= 6 (3 rope axes)"
            )
        if (self.vision_hidden_size // self.vision_num_heads) % 4:
            problems.append("vision_hidden_size / vision_num_heads must be a multiple of 4 (2-D rotary)")
        if problems:
            raise ValueError("Qwen35Dims: " + "; ".join(problems))
        return self

    @property
    def rotary_dim(self) -> int:
        """Channels of each text head that get rotary embedding (64 of 256 for the release)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_types(self) -> list[str]:
        """Attention kind of each decoder layer.

        Layer i is `full_attention` when (i + 1) is a multiple of `full_attention_interval`,
        else `linear_attention` (Gated DeltaNet).
        """
        every = self.full_attention_interval
        return ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(self.num_hidden_layers)]

    @property
    def mrope_section(self) -> list[int]:
        """Rotary frequency pairs per position axis (t, h, w), interleaved; [11, 11, 10] for 64 dims."""
        pairs = self.rotary_dim // 2
        base, rest = divmod(pairs, 3)
        return [base + (rest > 0), base + (rest > 1), base]

    @classmethod
    def qwen3_6_27b(cls, num_layers: int = 4) -> Qwen35Dims:
        """Qwen/Qwen3.6-27B's widths with `num_layers` decoder layers (the release has 64).

        Source: the release's `config.json`, whose vision widths are also transformers'
        `Qwen3_5VisionConfig` defaults (text: hidden 5120, intermediate 17408, 24 query / 4 KV
        heads of 256 with 25% rotary, Gated-DeltaNet 16 key / 48 value heads of 128, conv kernel 4,
        full attention every 4th layer; vision: 27 blocks 1152 wide, 16 heads, MLP 4304, patch 16,
        merge 2, temporal patch 2, output 5120).

        Args:
            num_layers: Decoder layers to keep, >= 1; layer i keeps the release's type of layer i.

        Raises:
            ValueError: If `num_layers` < 1.
        """
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers}: pass 1 or more (the release has 64)")
        return cls(
            hidden_size=5120,
            intermediate_size=17408,
            num_hidden_layers=num_layers,
            num_attention_heads=24,
            num_key_value_heads=4,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=48,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            vision_depth=27,
            vision_hidden_size=1152,
            vision_intermediate_size=4304,
            vision_num_heads=16,
            vision_out_hidden_size=5120,
        )


def qwen3_5_config(dims: Qwen35Dims, dtype: torch.dtype | None = None) -> Qwen3_5Config:
    """Build the transformers config for `dims`, laid out like the release's `config.json`.

    Args:
        dims: The widths.
        dtype: Stored as the config's `dtype` (the checkpoint's parameter dtype); None leaves it unset.

    Returns:
        A `Qwen3_5Config` with `architectures = ["Qwen3_5ForConditionalGeneration"]` (modelopt's
        export fails on an empty list) and `mtp_num_hidden_layers` in its text config.
    """
    from transformers import Qwen3_5Config

    text = {
        "vocab_size": dims.vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_hidden_layers,
        "layer_types": dims.layer_types,
        "full_attention_interval": dims.full_attention_interval,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "max_position_embeddings": dims.max_position_embeddings,
        "rms_norm_eps": dims.rms_norm_eps,
        "linear_num_key_heads": dims.linear_num_key_heads,
        "linear_num_value_heads": dims.linear_num_value_heads,
        "linear_key_head_dim": dims.linear_key_head_dim,
        "linear_value_head_dim": dims.linear_value_head_dim,
        "linear_conv_kernel_dim": dims.linear_conv_kernel_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": dims.rope_theta,
            "partial_rotary_factor": dims.partial_rotary_factor,
            "mrope_section": dims.mrope_section,
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": False,
        "eos_token_id": tok.ENDOFTEXT_ID,
        "mtp_num_hidden_layers": dims.mtp_num_hidden_layers,
        "mtp_use_dedicated_embeddings": False,
    }
    vision = {
        "depth": dims.vision_depth,
        "hidden_size": dims.vision_hidden_size,
        "intermediate_size": dims.vision_intermediate_size,
        "num_heads": dims.vision_num_heads,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "patch_size": dims.patch_size,
        "spatial_merge_size": dims.spatial_merge_size,
        "temporal_patch_size": dims.temporal_patch_size,
        "out_hidden_size": dims.vision_out_hidden_size,
        "num_position_embeddings": dims.vision_num_position_embeddings,
    }
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.IMAGE_PAD_ID,
        video_token_id=tok.VIDEO_PAD_ID,
        vision_start_token_id=tok.VISION_START_ID,
        vision_end_token_id=tok.VISION_END_ID,
        tie_word_embeddings=False,
        architectures=["Qwen3_5ForConditionalGeneration"],
    )
    if dtype is not None:
        config.dtype = dtype
        config.text_config.dtype = dtype
    return config
