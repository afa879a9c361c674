"""Keep credentials out of MLflow params/tags and Prefect logs.

Values of the environment variables named in :data:`SECRET_ENV` (Hugging Face and AWS
credentials, MLflow tokens) are replaced by ``***`` wherever quantdag records text, and any
``user:password@`` in a URL is masked.
"""

from __future__ import annotations

import os
import re

SECRET_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_KEY",
)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every secret environment value and URL credential replaced by ``***``."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
