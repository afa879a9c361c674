"""What the ``quantdag`` service commands do (``flows/cli.py`` wires them to the command line).

- :func:`prepare`: a fresh stack's inputs for a profile: the demo model and corpus (profile
  ``demo``) and the S3 buckets of its artifact store and of any other named location;
- :func:`serve_uis`: Prefect's and MLflow's UIs over this machine's stores, until Ctrl-C;
- :func:`run_deployment`: start a deployment run with dotted-key overrides and follow it the way
  ``prefect deployment run --watch`` does, but end a failed run with its error line (Prefect's
  CLI prints only the state's name);
- :func:`promote`: move the ``champion`` alias to a registered version.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from conf.schema import Profile

Echo = Callable[[str], None]
_LABELS = {"prefect": "Prefect", "mlflow": "MLflow"}


def prepare(profile: Profile, buckets: list[str], home: Path, rebuild: bool, echo: Echo) -> None:
    """Make what a first run of ``profile`` needs and does not make itself.

    Args:
        profile: the resolved profile (``demo``: its model and corpus are built under ``home/demo``).
        buckets: more ``s3://`` locations whose buckets to create (the MLflow server's
            ``--artifacts-destination``).
        home: ``QUANTDAG_HOME``.
        rebuild: rebuild the demo inputs even when complete.
        echo: prints one line.

    Raises:
        ValueError: a bucket location is not ``s3://``.
        OSError: a bucket cannot be created.
    """
    from quantdag.runtime.deploy import missing_inputs
    from quantdag.runtime.stack import ensure_buckets

    if profile.name == "demo":
        from quantdag.demo.workspace import build_demo_workspace

        echo(f"demo model and corpus: {build_demo_workspace(home / 'demo', rebuild=rebuild)}")
    locations = [profile.artifact_store] if profile.artifact_store.startswith(("s3://", "s3a://")) else []
    for bucket, status in ensure_buckets(locations + list(buckets)).items():
        echo(f"bucket {bucket}: {status}")
    for problem in missing_inputs(profile):
        echo(f"still missing: {problem}")


def serve_uis(tracking_uri: str, prefect_port: int, mlflow_port: int, log_dir: Path, echo: Echo) -> None:
    """Serve Prefect's UI (this user's Prefect database) and, for a SQLite store, MLflow's UI, until Ctrl-C.

    With ``PREFECT_API_URL`` set (a Prefect server elsewhere) or an MLflow server as
    ``tracking_uri``, that UI is not started: its address is printed.

    Raises:
        RuntimeError: a UI did not start (names its log file).
    """
    from quantdag.runtime.stack import start_ui, ui_commands

    commands = ui_commands(prefect_port, mlflow_port, tracking_uri)
    if api := os.environ.get("PREFECT_API_URL"):
        commands.pop("prefect")
        echo(f"Prefect UI: {api.rstrip('/').removesuffix('/api')} (PREFECT_API_URL is set: that server's UI)")
    if "mlflow" not in commands:
        echo(f"MLflow UI:  {tracking_uri}")
    urls = {"prefect": f"http://127.0.0.1:{prefect_port}", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    health = {"prefect": f"{urls['prefect']}/api/health", "mlflow": f"{urls['mlflow']}/health"}
    started = []
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the UIs as Ctrl-C does
    try:
        for name, argv in commands.items():
            started.append(start_ui(name, argv, urls[name], health[name], log_dir / f"{name}-ui.log"))
            echo(f"{_LABELS[name] + ' UI:':11} {urls[name]}")
        echo("Ctrl-C stops them.")
        while all(ui.process.poll() is None for ui in started):
            time.sleep(1)
        for ui in started:
            if ui.process.poll() is not None:
                echo(f"{ui.name} UI exited with {ui.process.returncode}; see {log_dir / f'{ui.name}-ui.log'}")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for ui in started:
            ui.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_deployment(deployment: str, parameters: dict[str, Any], name: str | None, watch: bool, timeout: float | None,
                   echo: Echo) -> int:
    """Start a run of ``deployment`` and, with ``watch``, follow it to its end; returns the exit code.

    The stream is Prefect's own (events and logs, as ``prefect deployment run --watch`` shows
    them). The last line says how the run ended and, unless it completed, the run's error (its
    state message) and how to read the whole log.

    Returns:
        0 when the run completed (or was started without ``watch``), 1 otherwise.

    Raises:
        prefect.exceptions.ObjectNotFound: no such deployment.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment as start

    from quantdag.runtime.tracking import prefect_run_link

    flow_run = start(deployment, parameters=parameters, flow_run_name=name, timeout=0)
    url, note = prefect_run_link(str(flow_run.id))
    echo(f"flow run {flow_run.name} ({flow_run.id}) of {deployment}: {url or ''} {note}".rstrip())
    if not watch:
        return 0
    from prefect.cli.flow_runs_watching import watch_flow_run
    from rich.console import Console

    try:
        asyncio.run(watch_flow_run(flow_run.id, Console(), timeout=int(timeout) if timeout else None))
    except Exception as err:  # noqa: BLE001 - a broken stream: the state below is read from the API
        echo(f"stopped following the run's stream ({type(err).__name__}); reading its state")
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    state = finished.state
    if state is not None and state.is_completed():
        echo(f"flow run {finished.name} finished in state {state.name!r}")
        return 0
    message = (state.message or "no message") if state is not None else "unknown state"
    echo(f"flow run {finished.name} finished in state {state.name if state else '?'!r}: {message.strip()}")
    echo(f"the whole log: prefect flow-run logs {flow_run.id}")
    return 1


def promote(profile: Profile, version: str, alias: str, echo: Echo) -> None:
    """Point ``alias`` of ``profile``'s registered model at ``version`` (:func:`quantdag.runtime.registry.promote`).

    Raises:
        ValueError: the version's checkpoint is missing or it has no passed audit.
        MlflowException: no such model or version.
    """
    from mlflow.tracking import MlflowClient

    from quantdag.runtime.registry import promote as move_alias
    from quantdag.runtime.secrets import redact

    move_alias(MlflowClient(tracking_uri=profile.tracking_uri), profile.model_name, version, alias)
    echo(redact(f"{profile.model_name} version {version} is now @{alias} ({profile.tracking_uri})"))
