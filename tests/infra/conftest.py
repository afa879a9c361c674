"""Shared fixtures for the infra/ checks: paths and the helper modules in infra/."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def _load(name: str):
    """Import infra/<name>.py (infra/ is no package; its modules import each other)."""
    if str(INFRA) not in sys.path:
        sys.path.insert(0, str(INFRA))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, INFRA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def validate():
    return _load("validate")


@pytest.fixture(scope="session")
def buildcontext():
    return _load("buildcontext")


@pytest.fixture(scope="session")
def wheelhouse_plan():
    return _load("wheelhouse_plan")
