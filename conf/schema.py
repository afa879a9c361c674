"""The typed run profile: one pydantic model that every flow, task and CLI command takes.

A profile is a YAML file under ``conf/profiles/`` (or any path) validated into :class:`Profile`
before any model or dataset is touched. Every model is frozen and forbids unknown keys, so a
typo in a YAML key or a Prefect UI form fails with the field's dotted name.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from conf.base import FrozenModel
from conf.recipe import MODULE_GROUPS, REFERENCE_EXCLUDE_MODULES, GroupFormats, RecipeSpec  # noqa: F401 - re-exported

SCHEMA_VERSION = 1


class BaseModelSpec(FrozenModel):
    """Where the BF16 base checkpoint comes from: exactly one of ``repo_id``, ``local_dir``."""

    repo_id: str | None = Field(None, description="Hugging Face Hub repo id, e.g. Qwen/Qwen3.6-27B")
    revision: str = Field("main", description="Hub branch, tag or commit sha; resolved to a sha at load")
    local_dir: str | None = Field(None, description="local directory holding config.json + safetensors")
    gguf_file: str | None = Field(
        None, description="GGUF file name inside local_dir (dequantized to BF16 by transformers)"
    )

    @field_validator("revision", mode="before")
    @classmethod
    def _revision_as_string(cls, value: object) -> object:
        # `prefect deployment run --param` parses values as JSON: a numeric revision arrives as an
        # int (kept: "12345"); a float cannot be turned back into the text that was meant
        # (a sha like 1234e56 reads as 1.234e59), so it is refused.
        if isinstance(value, float):
            raise ValueError(f"base.revision {value!r} was read as a number: quote it (YAML: revision: \"1234e56\"; "
                             f"deployment: --param revision='\"1234e56\"')")
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelSpec:
        if (self.repo_id is None) == (self.local_dir is None):
            raise ValueError(
                "base: set exactly one of base.repo_id (a Hub repo) or base.local_dir (a directory)"
            )
        if self.gguf_file and not self.local_dir:
            raise ValueError("base.gguf_file needs base.local_dir (the directory holding the file)")
        return self


class ImageTextSource(FrozenModel):
    """Image-text calibration rows in the Nemotron-VLM-Dataset-v2 layout.

    ``<subset>/<subset>.jsonl`` rows with chat ``messages`` and images in
    ``<subset>/media/shard_*.tar``. ``path`` is a local directory or an ``s3://`` prefix
    mirroring that layout; ``repo_id`` fetches the same files from the Hub.
    """

    repo_id: str | None = "nvidia/Nemotron-VLM-Dataset-v2"
    revision: str = "main"
    path: str | None = None
    subsets: tuple[str, ...] = ("sparsetables", "plotqa_cot", "wiki_en")
    num_samples: int = Field(128, gt=0)
    seed: int = 0
    max_image_pixels: int = Field(768 * 768, gt=0, description="images above this are downscaled")
    max_text_tokens: int = Field(1024, gt=0, description="text tokens kept per row; image tokens never cut")
    shards: int = Field(1, ge=1, description="calibrate in this many shards (rows i::shards, one task each), merged by max; in parallel when calibration_gpus > 1")

    @model_validator(mode="after")
    def _one_source(self) -> ImageTextSource:
        if self.path is None and self.repo_id is None:
            raise ValueError("image_text: set image_text.path (mirror) or image_text.repo_id (Hub)")
        if not self.subsets:
            raise ValueError("image_text.subsets is empty: name at least one subset")
        return self


class TextSource(FrozenModel):
    """Text calibration rows in the ``abisee/cnn_dailymail`` schema (``article``, ``highlights``, ``id``)."""

    repo_id: str | None = "abisee/cnn_dailymail"
    revision: str = "main"
    config: str = "3.0.0"
    split: str = "train"
    path: str | None = Field(None, description="local/s3 .jsonl or directory of .jsonl in the same schema")
    text_field: str = "article"
    num_samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=0, description="tokens per calibration sample")
    seed: int = 0
    shards: int = Field(1, ge=1, description="calibrate in this many shards (rows i::shards, one task each), merged by max; in parallel when calibration_gpus > 1")

    @model_validator(mode="after")
    def _one_source(self) -> TextSource:
        if self.path is None and self.repo_id is None:
            raise ValueError("text: set text.path (mirror) or text.repo_id (Hub)")
        return self


class EvalSpec(FrozenModel):
    """Held-out evaluation of NVFP4 vs BF16: plain text, and for VLMs image-text rows' answer tokens."""

    path: str | None = Field(None, description="raw text file (e.g. WikiText-2 wiki.test.raw)")
    repo_id: str | None = "Salesforce/wikitext"
    config: str = "wikitext-2-raw-v1"
    split: str = "test"
    seq_len: int = Field(512, gt=0, description="tokens per window")
    max_windows: int = Field(8, gt=0, description="windows of seq_len tokens evaluated")
    image_text_samples: int = Field(
        0, ge=0, description="held-out image-text rows (never used in calibration) scored on answer tokens; 0: skip"
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvalSpec:
        if self.path is None and self.repo_id is None:
            raise ValueError("eval: set eval.path (text file) or eval.repo_id (Hub dataset)")
        return self


class PlacementSpec(FrozenModel):
    """Where model steps put the weights: one device when they fit its budget, else spread (GiB = 2**30 bytes)."""

    memory_budget_gib: float | None = Field(None, gt=0, description=(
        "GiB each device may hold for one model step (each GPU it uses; host RAM with device: cpu). "
        "null: a GPU's whole memory, no limit on the CPU. Weights that do not fit go to the next GPU "
        "(placement.gpus), then host RAM, then disk"))
    reserve_fraction: float = Field(0.2, ge=0.0, lt=1.0, description=(
        "part of the budget kept free of weights: activations, calibration statistics, allocator slack"))
    gpus: int = Field(1, ge=1, le=64, description=(
        "GPUs one model step may spread its layers over, from the GPU it holds on (visible ordinals)"))



class CalibrationPoolSpec(FrozenModel):
    """Calibration shards as flow runs of a ``calibrate-shard`` deployment on a work pool (any host, one GPU each).

    Each calibration call (a branch, or a shard of one) becomes a flow run; its worker writes a
    heartbeat lease and, when done, the shard's record to the artifact store, the only place its
    quantizer state travels through. A run whose heartbeat stops (killed worker, lost node) is
    marked Crashed and submitted again, on whichever worker takes it.
    """

    deployment: str = Field("calibrate-shard/calibrate-shard", description=(
        "'<flow name>/<deployment name>' of the calibrate-shard deployment (prefect.yaml: calibrate-shard)"))
    lease_seconds: float = Field(120.0, ge=2, le=3600, description=(
        "a running shard renews its heartbeat every quarter of this; silent this long, it counts as dead"))
    start_timeout_seconds: float = Field(900.0, gt=0, le=86400, description=(
        "seconds a shard run taken by a worker may spend starting (process, imports) before its first heartbeat"))
    max_attempts: int = Field(3, ge=1, le=20, description="flow runs tried per shard before the flow fails")

_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
# scheme://<userinfo>@ : the user information of a URL's authority (user, user:password, token)
_URL_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/?#@\s]+@", re.IGNORECASE)
_CREDENTIAL_FIX = {
    "tracking_uri": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile)",
    "hf": "HF_TOKEN",
}


def _urls_with_credentials(value: object, field: str = "") -> list[tuple[str, str]]:
    """``(dotted field, masked URL)`` for every string of a raw profile that holds URL user information."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _urls_with_credentials(item, f"{field}.{key}".lstrip("."))]
    if isinstance(value, list | tuple):
        return [found for i, item in enumerate(value) for found in _urls_with_credentials(item, f"{field}.{i}")]
    if isinstance(value, str) and _URL_USERINFO.search(value):
        return [(field, _URL_USERINFO.sub(r"\1***@", value))]
    return []


def _credential_message(field: str, masked: str) -> str:
    scheme = masked.split("://", 1)[0].lower()
    fix = _CREDENTIAL_FIX.get(field) or _CREDENTIAL_FIX.get("s3" if scheme.startswith("s3") else scheme,
                                                              "the variables its client reads")
    return (f"{field} holds a credential in its URL ({masked}): a profile is logged and stored (MLflow params, Prefect "
            f"parameters), so remove it from the URL and set {fix} in the environment of the process that runs the flow")


class Profile(FrozenModel):
    """One quantization run: base checkpoint, recipe, calibration data, evaluation, stores.

    A URL with a credential in it (``http://user:password@host``, ``https://token@host``) is
    refused in every field: profiles are logged, stored as Prefect parameters and MLflow params.
    Validation errors never echo the input (``hide_input_in_errors``).
    """

    model_config = ConfigDict(hide_input_in_errors=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(description="lowercase letters, digits, '.', '-'; names the run and the model")
    base: BaseModelSpec
    recipe: RecipeSpec = RecipeSpec()
    image_text: ImageTextSource | None = Field(None, description="null for a text-only base model")
    text: TextSource
    eval: EvalSpec = EvalSpec()
    artifact_store: str = Field(description="local directory or s3://bucket/prefix for artifacts")
    tracking_uri: str = Field(description="MLflow tracking URI: sqlite:///path.db or http(s)://host:port")
    registered_model_name: str | None = Field(None, description="defaults to '<name>'")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    placement: PlacementSpec = PlacementSpec()
    calibration_gpus: int = Field(1, ge=1, le=64, description=(
        "GPUs calibration may use at once. 1: calibration runs in the flow's process, both branches on ONE "
        "model load when no branch is sharded, shards one after another. N > 1: each branch (or shard) is a task "
        "of its own in a pool of N worker processes, one GPU each (Prefect limits gpu-<i> of the visible GPUs), "
        "each loading the model"))
    calibration_pool: CalibrationPoolSpec | None = Field(None, description=(
        "null: calibrate on this host (calibration_gpus). Set: every calibration shard is a flow run of the "
        "calibrate-shard deployment on its work pool, one GPU each, on any host"))

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_urls(cls, data: object) -> object:
        found = _urls_with_credentials(data) if isinstance(data, dict) else []
        if found:
            raise ValueError("; ".join(_credential_message(field, masked) for field, masked in found))
        return data

    @model_validator(mode="after")
    def _one_calibration_layout(self) -> Profile:
        if self.calibration_pool is not None and self.calibration_gpus > 1:
            raise ValueError(
                f"calibration_pool and calibration_gpus {self.calibration_gpus} both ask for parallel calibration: "
                "with calibration_pool every shard runs on a GPU of the pool's workers; set calibration_gpus: 1 "
                "(or calibration_pool: null to calibrate on this host's GPUs)")
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"name {value!r} must be lowercase letters, digits, '.' or '-' (it names Prefect "
                "artifacts and the registered model)"
            )
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _no_file_store(cls, value: str) -> str:
        if value.startswith("file:") or "://" not in value:
            raise ValueError(
                f"tracking_uri {value!r}: MLflow 3's file store is deprecated; use "
                "sqlite:///path/mlflow.db or an http(s):// MLflow server"
            )
        return value

    @property
    def model_name(self) -> str:
        """Registered model name in MLflow's registry."""
        return self.registered_model_name or self.name
