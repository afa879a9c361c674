"""Where MLflow's descriptions and the CLI send people: a Prefect UI that serves the run, the local
UIs of ``quantdag ui`` for stores without a server, never a dead temporary API."""

from __future__ import annotations

import pytest

from flows.cli import temporary_prefect_api
from quantdag.runtime.tracking import LOCAL_MLFLOW_UI, LOCAL_PREFECT_UI, mlflow_ui_base, prefect_run_link
from services import free_port

RUN = "0b4a3c1e-1f2d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.mark.slow
def test_prefect_link_goes_to_the_ui_that_serves_the_run(prefect_api: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path) -> None:
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the session's server, its UI on
    assert prefect_run_link(RUN) == (f"{prefect_api.removesuffix('/api')}/runs/flow-run/{RUN}", "")

    with temporary_prefect_api():  # the API of a `quantdag run`: this user's database, no UI, gone after the run
        url, note = prefect_run_link(RUN)
    assert url == f"{LOCAL_PREFECT_UI}/runs/flow-run/{RUN}" and "quantdag ui" in note
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")  # nothing answers there
    assert prefect_run_link(RUN) == (url, note)

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.invalid:4200/api")  # a remote API without a UI
    url, note = prefect_run_link(RUN)
    assert url is None and "serves no UI" in note

    monkeypatch.setenv("PREFECT_UI_URL", "https://prefect.example.com/")  # a UI hosted apart from the API
    assert prefect_run_link(RUN) == (f"https://prefect.example.com/runs/flow-run/{RUN}", "")


def test_mlflow_ui_of_a_server_is_the_server_and_of_sqlite_the_local_ui() -> None:
    assert mlflow_ui_base("http://mlflow:5000/") == "http://mlflow:5000"
    assert mlflow_ui_base("sqlite:////home/me/.quantdag/mlflow.db") == LOCAL_MLFLOW_UI
