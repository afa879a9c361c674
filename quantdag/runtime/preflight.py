"""Preflight: check every remote endpoint and every countable input a run depends on before any model is loaded.

A quantize run writes artifacts (local or S3), Prefect results and leases (Prefect's default
result storage) and MLflow records. If one of them is unreachable the run would fail only after
minutes of model loading, with a botocore or urllib3 traceback that names no endpoint. The
preflight step probes each of them with short timeouts and no retries, and raises ONE error that
names every unreachable endpoint and where its address came from.

It also counts what can be counted without a model (:func:`countable_shortfalls`): the image-text
subsets exist, each holds enough rows for its calibration share plus its held-out evaluation
share, a text mirror holds enough rows with text. Counting stops as soon as a source has enough,
so it reads a few hundred rows, not the source.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import fsspec

from conf.schema import Profile
from quantdag.runtime.locks import gpu_limit_names
from quantdag.runtime.secrets import redact
from quantdag.runtime.sources import (existing_subsets, image_text_root, iter_jsonl, missing_subset_message, shares,
                                      subset_jsonl, text_files)

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0


class PreflightError(ConnectionError):
    """An endpoint the run needs is unreachable; the message names each one."""


def s3_endpoint() -> str:
    """The S3 endpoint s3fs/botocore will use, and which variable set it."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return f"{os.environ[name]} (from {name})"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return f"https://s3.{region}.amazonaws.com (AWS default; set AWS_ENDPOINT_URL for MinIO/Ceph)"


def check_s3(url: str, what: str) -> None:
    """HEAD the bucket of ``url`` (``s3://bucket/...``) with one attempt and short timeouts.

    Raises:
        PreflightError: the endpoint does not answer, or the bucket is missing or forbidden.
    """
    import s3fs

    bucket = url.split("://", 1)[1].split("/", 1)[0]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
        "connect_timeout": TIMEOUT_SECONDS, "read_timeout": TIMEOUT_SECONDS, "retries": {"max_attempts": 1}})
    fs.retries = 1  # s3fs's own retry loop (class default 5, with backoff)
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as err:  # noqa: BLE001 - any failure means the run cannot write there
        raise PreflightError(f"{what} {url}: S3 bucket {bucket!r} not reachable or usable at {s3_endpoint()}: "
                             f"{type(err).__name__}: {err}") from err


def check_local(path: str, what: str) -> None:
    """Check that a local directory exists or can be created and is writable.

    Raises:
        PreflightError: it cannot be created or written.
    """
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as err:
        raise PreflightError(f"{what} {path}: {err}") from err


def check_store(url: str, what: str) -> None:
    """Check an artifact or result location: ``s3://`` buckets are probed, local paths created."""
    if url.startswith(("s3://", "s3a://")):
        check_s3(url, what)
    elif "://" not in url or url.startswith("file://"):
        check_local(url.removeprefix("file://"), what)


def check_tracking(uri: str) -> None:
    """GET ``<uri>/health`` of an http(s) MLflow server; check a SQLite file's directory.

    Raises:
        PreflightError: the server does not answer 200 within the timeout.
    """
    if uri.startswith("sqlite:///"):
        check_local(str(Path(uri.removeprefix("sqlite:///")).parent), "MLflow SQLite store directory")
        return
    if not uri.startswith(("http://", "https://")):
        return
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            if response.status != 200:
                raise urllib.error.HTTPError(url, response.status, "unhealthy", response.headers, None)
    except (OSError, urllib.error.URLError) as err:
        raise PreflightError(f"MLflow tracking server {uri} unreachable ({url}): {type(err).__name__}: {err}") from err


def result_storage_location() -> str | None:
    """Basepath of Prefect's default result storage (where task results and leases live), if any."""
    from prefect.results import get_default_result_storage

    storage = get_default_result_storage(_sync=True)
    basepath = getattr(storage, "basepath", None)
    return str(basepath) if basepath else None


_HINTS = {
    "base.local_dir": "build or fetch the model first (`quantdag demo`, `quantdag fetch-smollm2`)",
    "text.path": "point it at a cnn_dailymail-schema .jsonl (QUANTDAG_DATA locates ../shared/data)",
    "eval.path": "point it at a raw text file (QUANTDAG_DATA locates ../shared/data)",
    "image_text.path": "point it at a Nemotron-VLM-Dataset-v2-layout mirror",
}


def _may_be_vlm(profile: Profile) -> bool:
    """False only for a local base whose config.json has no vision_config (its image branch is skipped)."""
    config = Path(profile.base.local_dir or "").expanduser() / "config.json"
    if profile.base.gguf_file:
        return False
    if profile.base.local_dir is None or not config.is_file():
        return True
    return "vision_config" in config.read_text()


def missing_local_inputs(profile: Profile) -> list[str]:
    """One line per local input path of ``profile`` (no ``scheme://``) that does not exist, naming the field."""
    fields = {
        "base.local_dir": profile.base.local_dir,
        "text.path": profile.text.path,
        "eval.path": profile.eval.path,
        "image_text.path": profile.image_text.path if profile.image_text and _may_be_vlm(profile) else None,
    }
    return [f"{field} {path} does not exist: {_HINTS[field]}" for field, path in fields.items()
            if path and "://" not in path and not Path(path).expanduser().exists()]


def gpu_shortfall(profile: Profile, env: dict[str, str] | None = None) -> list[str]:
    """One line when ``calibration_gpus`` asks for more GPUs than this process may take slots of.

    The GPUs are the entries of ``CUDA_VISIBLE_DEVICES`` (``quantdag.runtime.locks.gpu_limit_names``);
    without it every worker process would pick the same GPU.
    """
    if profile.calibration_gpus == 1 or profile.device == "cpu":
        return []
    if profile.device == "auto":
        import torch

        if not torch.cuda.is_available():
            return []  # "auto" runs on the CPU here: worker processes, no GPUs to share
    visible = gpu_limit_names(env)
    if len(visible) >= profile.calibration_gpus:
        return []
    return [f"calibration_gpus {profile.calibration_gpus}: this worker may use {len(visible)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={(env or os.environ).get('CUDA_VISIBLE_DEVICES', '<unset>')}); list "
            f"{profile.calibration_gpus} GPUs in CUDA_VISIBLE_DEVICES (one Prefect limit gpu-<i> each) or lower calibration_gpus"]


def _rows(fs: Any, path: str, shown: str, enough: int, has_text: str | None = None) -> int:
    """Rows of a ``.jsonl`` file (with a non-empty ``has_text`` field, if given), counted up to ``enough``."""
    count = 0
    for _, row in iter_jsonl(fs, path, shown):
        text = row.get(has_text) if has_text else "row"
        count += isinstance(text, str) and bool(text.strip())
        if count >= enough:
            break
    return count


def _image_text_shortfalls(profile: Profile) -> list[str]:
    source, held_out = profile.image_text, profile.eval.image_text_samples
    if source.path is not None and "://" not in source.path and not Path(source.path).expanduser().exists():
        return []  # reported by missing_local_inputs
    try:
        root, _ = image_text_root(source)
        fs, root_path = fsspec.core.url_to_fs(root)
    except Exception as err:  # noqa: BLE001 - the Hub: the fetch step retries and reports it
        log.warning("preflight cannot count the image-text rows of %s@%s (%s); the fetch step will",
                    source.repo_id, source.revision, err)
        return []
    calibration = shares(source.num_samples, source.subsets)
    evaluation = shares(held_out, source.subsets) if held_out else dict.fromkeys(source.subsets, 0)
    problems = []
    for subset in source.subsets:
        path, shown = subset_jsonl(root_path, subset), subset_jsonl(root, subset)
        if not fs.exists(path):
            problems.append(missing_subset_message(root, subset, existing_subsets(fs, root_path)))
            continue
        needed = calibration[subset] + evaluation[subset]
        rows = _rows(fs, path, shown, needed)
        if rows < needed:
            problems.append(
                f"image_text subset {subset!r}: {shown} holds {rows} rows; the run takes {calibration[subset]} for "
                f"calibration (image_text.num_samples={source.num_samples}) and {evaluation[subset]} held-out rows "
                f"(eval.image_text_samples={held_out}), none shared: lower those or add rows")
    return problems


def _text_shortfalls(profile: Profile) -> list[str]:
    source = profile.text
    if source.path is None or ("://" not in source.path and not Path(source.path).expanduser().exists()):
        return []  # the Hub (counted by the fetch, before any model loads) or missing (reported elsewhere)
    fs, path = fsspec.core.url_to_fs(source.path)
    files = text_files(fs, path)
    if not files:
        return [f"text.path {source.path} holds no .jsonl files: point it at cnn_dailymail-schema .jsonl rows"]
    rows = 0
    for file in files:
        shown = file if "://" not in source.path else f"{source.path.split('://', 1)[0]}://{file}"
        rows += _rows(fs, file, shown, source.num_samples - rows, has_text=source.text_field)
        if rows >= source.num_samples:
            return []
    return [f"text.path {source.path} holds {rows} rows with a non-empty {source.text_field!r}, "
            f"text.num_samples={source.num_samples} requested: lower text.num_samples or add rows"]


def countable_shortfalls(profile: Profile) -> list[str]:
    """One line per countable input that cannot fill the run, each naming the source and the fix.

    Checks, reading only as many rows as the run needs: every image-text subset exists (else the
    subsets the source has are named) and holds its calibration share plus its held-out share
    (when the base may be a VLM); a text mirror holds ``text.num_samples`` rows with text. A
    malformed row among those read is reported by file and line.
    """
    problems = []
    checks = [_text_shortfalls] + ([_image_text_shortfalls] if profile.image_text and _may_be_vlm(profile) else [])
    for check in checks:
        try:
            problems += check(profile)
        except ValueError as err:  # a malformed row, named by file and line
            problems.append(str(err))
        except OSError as err:
            problems.append(f"cannot read an input of the profile: {type(err).__name__}: {err}")
    return problems


def preflight(profile: Profile) -> dict[str, Any]:
    """Check local input paths, probe the artifact store, MLflow and Prefect's result storage, then
    (when all of that passed) count the inputs (:func:`countable_shortfalls`); fail naming every
    missing path (by field), every bad endpoint or every input that cannot fill the run.

    Returns:
        What was checked: ``artifact_store``, ``tracking_uri``, ``result_storage``, ``s3_endpoint``.

    Raises:
        PreflightError: a local input is missing, an endpoint is unreachable or an input cannot
            fill the run (one line each, naming the field or source and the fix).
    """
    results = result_storage_location()
    checks = [(check_store, profile.artifact_store, "artifact store"), (check_tracking, profile.tracking_uri, None)]
    if results:
        checks.append((check_store, results, "Prefect result storage"))
    failures = missing_local_inputs(profile) + gpu_shortfall(profile)
    for check, target, what in checks:
        try:
            check(target, what) if what else check(target)
        except PreflightError as err:
            failures.append(str(err))
    if not failures:  # inputs on an unreachable S3 would only add retries
        failures += countable_shortfalls(profile)
    if failures:
        raise PreflightError(redact("preflight failed before loading any model:\n  " + "\n  ".join(failures)))
    return {"artifact_store": profile.artifact_store, "tracking_uri": redact(profile.tracking_uri),
            "result_storage": results, "s3_endpoint": s3_endpoint()}
