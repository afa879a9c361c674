"""Keep credentials out of MLflow params/tags, Prefect logs and everything else quantdag records.

Values of the environment variables named in :data:`SECRET_ENV` (Hugging Face and AWS
credentials, MLflow and Prefect tokens) are replaced by ``***`` wherever quantdag records text,
and the user information of any URL (``scheme://user:password@host``, ``scheme://token@host``) is
masked (:func:`redact`). Profiles refuse such URLs outright (``conf.schema``); masking is what
catches a credential that arrives another way (an environment variable, a library's error text).

:func:`install_log_redaction` applies :func:`redact` to every log record a process creates,
whichever logger emits it (quantdag's, Prefect's run loggers, MLflow's, botocore's) and whichever
handler ships it (the console, Prefect's API log handler into its database).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

SECRET_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_KEY",
)
# scheme://<userinfo>@ : the authority's user information, with or without a password
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/?#@\s]+@", re.IGNORECASE)
_install_lock = threading.Lock()
_installed = False


def redact(text: str) -> str:
    """``text`` with every secret environment value and every URL's user information replaced by ``***``."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def has_url_credentials(text: str) -> bool:
    """True when ``text`` holds a URL with user information (``scheme://user[:password]@host``)."""
    return bool(_URL_CREDENTIALS.search(text))


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask secrets in a log record's message and exception text, in place; returns the record.

    A message that changes is stored formatted (``args`` dropped); an exception whose text changes
    is kept as masked text only (``exc_text``), so no handler can render the original.
    """
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed format string is logging's own error to report
        return record
    masked = redact(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        masked = redact(text)
        if masked != text:
            record.exc_info, record.exc_text = None, masked
    return record


def install_log_redaction() -> None:
    """Make every log record of this process pass through :func:`redact_record` (idempotent).

    Wraps the process's log record factory, so it applies to records of any logger, created in
    any thread, before any handler or filter sees them.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = True
