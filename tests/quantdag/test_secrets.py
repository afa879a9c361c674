"""Credentials are refused in profiles and masked in every log record, whichever logger emits it."""

from __future__ import annotations

import io
import logging

import pytest

from conf import load_profile
from quantdag.runtime.secrets import has_url_credentials, install_log_redaction, redact

PASSWORD = "quantdag-PLANTED-4711"


def test_redact_masks_url_user_information_and_secret_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_plantedtoken123")
    assert redact(f"http://user:{PASSWORD}@host:5000/api") == "http://***@host:5000/api"
    assert redact("https://hf_plantedtoken123@huggingface.co") == "https://***@huggingface.co"
    assert redact("token hf_plantedtoken123 used") == "token *** used"
    for kept in ("hf://datasets/nvidia/x@main/a.jsonl", "sqlite:////tmp/mlflow.db", "s3://bucket/a@b", "user@example.com"):
        assert redact(kept) == kept and not has_url_credentials(kept)


def test_every_log_record_is_masked_message_and_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    install_log_redaction()
    install_log_redaction()  # idempotent
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("quantdag.reaper")
    logger.addHandler(handler)
    try:
        logger.warning("could not end the MLflow runs of %s: %s", "run-1", f"GET http://u:{PASSWORD}@h/api failed")
        try:
            raise ConnectionError(f"connection to http://u:{PASSWORD}@h refused")
        except ConnectionError:
            logger.exception("reaper failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert PASSWORD not in text, text
    assert "http://***@h/api failed" in text and "ConnectionError: connection to http://***@h refused" in text


@pytest.mark.parametrize("field, value, fix", [
    ("tracking_uri", f"http://user:{PASSWORD}@127.0.0.1:5000", "MLFLOW_TRACKING_PASSWORD"),
    ("artifact_store", f"s3://AKIA:{PASSWORD}@bucket/prefix", "AWS_SECRET_ACCESS_KEY"),
    ("text.path", f"https://{PASSWORD}@example.org/rows.jsonl", "the variables its client reads"),
])
def test_a_profile_refuses_a_credential_in_any_url_naming_field_and_fix(field: str, value: str, fix: str) -> None:
    override: dict = {}
    node = override
    *parents, leaf = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ValueError) as caught:
        load_profile("demo", {**override})
    message = str(caught.value).split("invalid profile:", 1)[1]  # what follows the (unmasked) overrides echo
    assert f"{field} holds a credential in its URL" in message and fix in message
    assert PASSWORD not in message


def test_the_validation_error_itself_never_echoes_the_input() -> None:
    from pydantic import ValidationError

    from conf.schema import Profile

    with pytest.raises(ValidationError) as caught:
        Profile.model_validate({"name": "x", "base": {"local_dir": "/m"}, "text": {"path": "/t.jsonl"},
                                "artifact_store": "/a", "tracking_uri": f"http://u:{PASSWORD}@h"})
    assert PASSWORD not in str(caught.value)
