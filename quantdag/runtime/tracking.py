"""MLflow lineage for quantize flow runs: one parent run per flow run, one child run per step.

Everything goes through an explicit ``MlflowClient`` and explicit run ids: MLflow's active run is
per thread, and Prefect runs submitted tasks in worker threads, so ``mlflow.start_run`` there
would make unrelated top-level runs. Child runs are logged by the flow from each step's returned
reference, so a step that was a cache hit still gets its child run (tagged ``cached=true``) and
every parent run has the full lineage.

A retried flow run (Prefect UI "Retry" keeps the flow-run id) reattaches to the parent run that
carries its ``prefect.flow_run_id`` tag instead of creating a second one.

While a parent run is open, a :class:`Heartbeat` thread stamps its ``quantdag.heartbeat`` tag, and
the parent carries the identity of the process running the flow (``quantdag.process``,
:mod:`quantdag.runtime.liveness`), so ``quantdag.runtime.reaper`` can tell a run whose process was
killed (process gone, or no heartbeat) from a live one.

Every param and tag passes through :func:`quantdag.runtime.secrets.redact` on its way to MLflow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from conf.settings import settings
from quantdag.runtime.liveness import PROCESS_TAG, process_identity
from quantdag.runtime.registry import register_checkpoint
from quantdag.runtime.secrets import redact

EXPERIMENT = "quantdag"
HEARTBEAT_TAG = "quantdag.heartbeat"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3 opens an experiment without this tag in its GenAI (traces) view; this kind opens the
runs table and charts ("Model training")."""
DESCRIPTION_TAG = "mlflow.note.content"
"""The tag MLflow's UI shows, as markdown, as a run's description."""
LOCAL_PREFECT_UI = "http://127.0.0.1:4200"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
"""Where ``quantdag ui`` serves Prefect's and MLflow's UIs over this machine's own stores (its default ports)."""
_MAX_PARAM = 6000
log = logging.getLogger(__name__)


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite tracking store, artifacts go beside the database file (``<db dir>/mlflow-artifacts``)
    instead of MLflow's default ``./mlruns`` in whatever directory the process started in; a server
    decides its own artifact location (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
    return (database.resolve().parent / "mlflow-artifacts").as_uri()


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Flatten a nested dict/list into ``{"a.b.0": "value"}`` strings for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    if isinstance(value, list | tuple):
        return {prefix: json.dumps(list(value))[:_MAX_PARAM]}
    return {prefix: str(value)[:_MAX_PARAM]}


def safe_tags(tags: dict[str, Any]) -> dict[str, str]:
    """``tags`` as strings with secrets masked (:func:`quantdag.runtime.secrets.redact`)."""
    return {key: redact(str(value)) for key, value in tags.items()}


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``values`` (bools excluded), as floats."""
    return {
        k: float(v) for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class Tracker:
    """Parent/child MLflow runs of one quantize flow run.

    Args:
        tracking_uri: ``sqlite:///...`` or ``http(s)://`` MLflow server.
        experiment: experiment name (created when missing).
    """

    def __init__(self, tracking_uri: str, experiment: str = EXPERIMENT) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.attempt = 1  # of the flow run whose parent run this tracker opened (:meth:`parent`)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=local_artifact_location(tracking_uri),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if found is not None and EXPERIMENT_KIND_TAG not in found.tags:  # made before the kind was set
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def parent(self, flow_run_id: str, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        """Create (or, for a retried flow run, reopen) the parent run; returns its id."""
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`quantdag.role` = 'parent'",
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            self.attempt = int(existing[0].data.tags.get("quantdag.attempts", "1")) + 1
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "quantdag.attempts", str(self.attempt))
            self.client.set_tag(run_id, PROCESS_TAG, process_identity())  # the retry runs in another process
            Heartbeat.start(self.client, run_id)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=run_name,
            tags=safe_tags({**tags, "prefect.flow_run_id": flow_run_id, "quantdag.role": "parent",
                            "quantdag.attempts": "1", PROCESS_TAG: process_identity()}),
        )
        self._log(run.info.run_id, params=params)
        Heartbeat.start(self.client, run.info.run_id)
        return run.info.run_id

    def child(self, parent_id: str, step: str, *, cached: bool, params: dict[str, Any] | None = None,
              metrics: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
              artifacts: list[Path] | None = None, datasets: list[dict[str, str]] | None = None) -> str:
        """Log one finished step as a child run of ``parent_id``; returns the child run id.

        ``datasets`` entries have ``name``, ``digest``, ``source`` and ``context`` (logged with
        ``log_inputs``). A finished step's child is FINISHED; re-logging a step on a retried flow
        run replaces nothing and adds a new child: children carry the tag ``quantdag.attempt``
        and, from attempt 2 on, are named ``<step> (attempt <n>)``.
        """
        name = step if self.attempt == 1 else f"{step} (attempt {self.attempt})"
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags=safe_tags({"mlflow.parentRunId": parent_id, "quantdag.step": step, "cached": str(cached).lower(),
                            "quantdag.attempt": self.attempt, **(tags or {})}),
        )
        run_id = run.info.run_id
        self._log(run_id, params=flatten("", params or {}), metrics=numeric(metrics or {}))
        for entry in datasets or []:
            dataset = Dataset(name=entry["name"], digest=entry["digest"][:36], source_type="quantdag", source=redact(json.dumps({"uri": entry["source"]})))
            self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", entry["context"])])])
        for path in artifacts or []:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def log_json(self, run_id: str, name: str, payload: Any) -> None:
        """Log ``payload`` as JSON artifact ``name`` on ``run_id``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=1, default=str))
            self.client.log_artifact(run_id, str(path))

    def _log(self, run_id: str, params: dict[str, str] | None = None, metrics: dict[str, float] | None = None) -> None:
        safe = {k: redact(v) for k, v in (params or {}).items()}
        items = [Param(k, v) for k, v in safe.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])
        if metrics:
            self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        RunStatus.from_string(status)
        Heartbeat.stop(run_id)
        self.client.set_terminated(run_id, status)

    def register(self, parent_id: str, model_name: str, source_uri: str, tags: dict[str, str]) -> str:
        """Register a checkpoint as a model version (:func:`quantdag.runtime.registry.register_checkpoint`:
        one version per ``checkpoint_sha256`` tag, linked to ``parent_id``); returns the version number."""
        return register_checkpoint(self.client, self.experiment_id, parent_id, model_name, source_uri, tags).number

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        """Set one tag, secrets masked."""
        self.client.set_tag(run_id, key, redact(str(value)))

    def run_path(self, run_id: str) -> str:
        """The run's page relative to MLflow's UI (``#/experiments/<id>/runs/<run>``): a link that works in
        a description whatever host serves the UI."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    def ui_base(self) -> str:
        """MLflow's UI for this store: the tracking server itself, or for SQLite the local UI of
        ``quantdag ui`` (:data:`LOCAL_MLFLOW_UI`); secrets masked."""
        return redact(mlflow_ui_base(self.tracking_uri))

    def run_url(self, run_id: str) -> str:
        """Absolute link to the run in MLflow's UI (:meth:`ui_base`); secrets masked."""
        return f"{self.ui_base()}/{self.run_path(run_id)}"


def heartbeat_seconds() -> float:
    """Seconds between heartbeats of an open parent run.

    ``QUANTDAG_HEARTBEAT_SECONDS``, default 30 (:mod:`conf.settings`).
    """
    return settings().heartbeat_seconds


class Heartbeat:
    """A daemon thread that sets ``quantdag.heartbeat`` (Unix seconds) on an open run every interval.

    It dies with its process, so a run killed with ``kill -9`` stops beating; a failed beat (MLflow
    briefly unreachable) is logged and the next one is tried.
    """

    _running: dict[str, Heartbeat] = {}

    def __init__(self, client: MlflowClient, run_id: str, interval: float) -> None:
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name=f"mlflow-heartbeat-{run_id[:8]}", daemon=True)

    @classmethod
    def start(cls, client: MlflowClient, run_id: str) -> Heartbeat:
        """Beat once now, then every :func:`heartbeat_seconds` until :meth:`stop`."""
        cls.stop(run_id)
        beat = cls(client, run_id, heartbeat_seconds())
        beat._beat()
        cls._running[run_id] = beat
        beat._thread.start()
        return beat

    @classmethod
    def stop(cls, run_id: str) -> None:
        """Stop the heartbeat of ``run_id`` (no-op when none runs in this process)."""
        beat = cls._running.pop(run_id, None)
        if beat is not None:
            beat._stopped.set()

    def _beat(self) -> None:
        self.client.set_tag(self.run_id, HEARTBEAT_TAG, str(int(time.time())))

    def _beat_forever(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self._beat()
            except Exception as err:  # noqa: BLE001 - a missed beat must not kill the run
                log.warning("MLflow heartbeat of run %s failed: %s", self.run_id, err)


def mlflow_ui_base(tracking_uri: str) -> str:
    """MLflow's UI for ``tracking_uri``: an http(s) server serves its own; a SQLite store is served
    by ``quantdag ui`` at :data:`LOCAL_MLFLOW_UI`."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI


def prefect_ui_base() -> tuple[str | None, bool]:
    """Prefect's UI for this process's API and whether it is served there now.

    ``PREFECT_UI_URL`` when set (trusted: a UI may be hosted apart from the API); otherwise the
    API's URL without ``/api``, served when ``GET <ui>/ui-settings`` answers within 3 s with a
    non-empty ``available_uis`` (Prefect's server lists the UI bundles it mounted; none with its
    UI off). The temporary API of a ``quantdag run`` serves no UI.

    Returns:
        ``(url or None, served)``.
    """
    if os.environ.get("PREFECT_UI_URL"):
        return os.environ["PREFECT_UI_URL"].rstrip("/"), True
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not api.endswith("/api"):
        return None, False
    ui = api.removesuffix("/api")
    try:
        with urllib.request.urlopen(f"{ui}/ui-settings", timeout=3) as response:
            return ui, bool(json.loads(response.read()).get("available_uis"))
    except (OSError, ValueError, AttributeError):  # unreachable, or not Prefect's answer
        return ui, False


def prefect_run_link(flow_run_id: str) -> tuple[str | None, str]:
    """Where to open a flow run in Prefect's UI, and a note for people.

    Returns:
        ``(url, note)``: the run's page on the UI that serves this API (:func:`prefect_ui_base`);
        for an API on this machine that serves no UI (a ``quantdag run``'s temporary API, whose
        runs live in this user's Prefect database), the page on ``quantdag ui``'s local UI and a
        note saying to start it; for a remote API without a UI, no URL.
    """
    ui, served = prefect_ui_base()
    path = f"/runs/flow-run/{flow_run_id}"
    if ui and served:
        return f"{ui}{path}", ""
    host = urllib.parse.urlsplit(ui or "").hostname
    if ui is None or host in ("127.0.0.1", "localhost", "::1"):
        return f"{LOCAL_PREFECT_UI}{path}", "this run's Prefect API has no UI: open it with `quantdag ui`"
    return None, f"flow run {flow_run_id} on the Prefect API {ui}/api, which serves no UI"


def prefect_run_url(flow_run_id: str) -> str | None:
    """URL of a flow run in a Prefect UI that serves it now (:func:`prefect_ui_base`), else None."""
    ui, served = prefect_ui_base()
    return f"{ui}/runs/flow-run/{flow_run_id}" if ui and served else None
