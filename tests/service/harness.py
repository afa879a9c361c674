"""Drive the deployed quantize flow the way an operator does: ``prefect deployment run`` in a
subprocess, then read what Prefect, MLflow and S3 recorded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAULTS = Path(__file__).resolve().parent / "faults"
DEPLOYMENT = "quantize/demo"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``prefect ARGS`` from the repository root; returns the finished process (stdout+stderr text)."""
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def task_states(flow_run_id: str, attempt: int | None = None) -> dict[str, str]:
    """Step name (``calibrate_text``) -> state name (``Completed``, ``Cached``, ``Failed``) of one flow run.

    Args:
        attempt: only task runs of this flow-run attempt (a UI Retry is attempt 2); None: the latest.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    attempt = attempt or max((run.flow_run_run_count for run in runs), default=1)
    return {re.sub(r"-[0-9a-f]{3}$", "", run.name): run.state.name for run in runs if run.flow_run_run_count == attempt}


def task_result(flow_run_id: str, step: str) -> Any:
    """The persisted return value of ``step`` in the latest attempt of a flow run (read from S3)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    latest = max(run.flow_run_run_count for run in runs)
    (run,) = [r for r in runs if r.flow_run_run_count == latest and re.sub(r"-[0-9a-f]{3}$", "", r.name) == step]
    import fsspec
    from prefect.results import ResultRecord

    metadata = run.state.data
    if metadata.storage_block_id is not None:  # the record lies in the result storage block (S3)
        from prefect.blocks.core import Block

        block = Block.load_from_ref(metadata.storage_block_id)
        return ResultRecord.deserialize(block.read_path(metadata.storage_key)).result
    # a Cached state's metadata may name the record's full key and no storage block: read it directly
    with fsspec.open(metadata.storage_key, "rb") as handle:
        return ResultRecord.deserialize(handle.read()).result


def read_flow_run(flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def wait_for(flow_run_id: str, timeout: float = 300, states: set[str] = TERMINAL) -> Any:
    """Poll until the flow run's state type is in ``states``; returns the flow run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = read_flow_run(flow_run_id)
        if run.state and run.state.type.value in states:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} still {run.state.name if run.state else '?'} after {timeout:.0f} s")


def flow_logs(flow_run_id: str) -> list[str]:
    """Every log message Prefect stored for the flow run and its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        out, offset = [], 0
        while batch := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        offset=offset, limit=200):
            out += [entry.message for entry in batch]
            offset += len(batch)
    return out


@dataclass
class Stack:
    """The deployed demo deployment and what the tests need to drive it."""

    prefect_api: str
    mlflow: str
    s3: str
    home: Path
    fault_dir: Path
    deployment_env: dict[str, str]
    cli_env: dict[str, str]
    flow_runs: list[str] = field(default_factory=list)
    workers: Any = None

    def run(self, *params: str, env: dict[str, str] | None = None, wait: bool = True, timeout: float = 300) -> Any:
        """``prefect deployment run quantize/demo --param ...``; returns the flow run (finished if ``wait``).

        Args:
            params: ``k=v`` strings, passed as ``--param k=v`` (the CLI parses ``v`` as JSON).
            env: added to the deployment's job-variable env for this run only.
        """
        args = ["deployment", "run", DEPLOYMENT]
        for param in params:
            args += ["--param", param]
        if env:
            args += ["--job-variable", f"env={json.dumps({**self.deployment_env, **env})}"]
        done = cli(*args, env=self.cli_env)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
        self.flow_runs.append(flow_run_id)
        return wait_for(flow_run_id, timeout) if wait else read_flow_run(flow_run_id)

    def fault_env(self, action: str, kind: str) -> dict[str, str]:
        """Job-variable env that injects ``action`` (raise/pause) at the manifest of a ``kind`` artifact."""
        path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "QUANTDAG_FAULT": f"{action}:{kind}", "QUANTDAG_FAULT_DIR": str(self.fault_dir)}

    def wait_marker(self, flow_run_id: str, action: str, kind: str, timeout: float = 240) -> dict[str, Any]:
        """Wait until the fault fired in ``flow_run_id``; returns its marker (pid, process groups, path)."""
        marker = self.fault_dir / f"{flow_run_id}-{action}-{kind}.json"
        deadline = time.monotonic() + timeout
        while not marker.exists():
            run = read_flow_run(flow_run_id)
            if run.state.type.value in TERMINAL:
                raise AssertionError(f"flow run ended {run.state.name} before the {action}:{kind} fault: {run.state.message}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fault {action}:{kind} not reached in {timeout:.0f} s")
            time.sleep(0.5)
        return json.loads(marker.read_text())

    def mlflow_client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow)

    def parent_runs(self, flow_run_id: str) -> list[Any]:
        """MLflow parent runs tagged with ``flow_run_id`` (exactly one when reattachment works)."""
        client = self.mlflow_client()
        experiment = client.get_experiment_by_name("quantdag")
        return client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`quantdag.role` = 'parent'")

    def flow_result(self, flow_run: Any) -> dict[str, Any]:
        """The flow's return value, read from the persisted result (on S3)."""
        return flow_run.state.result()


def kill_groups(*pgids: int) -> None:
    """SIGKILL each process group (the worker's, and the flow run's own groups)."""
    for pgid in sorted(set(pgids)):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_flow_run_processes(flow_run_ids: list[str]) -> None:
    """SIGKILL the sessions of processes still running one of these flow runs (test teardown).

    A process worker starts each flow run in a session of its own, so stopping the worker leaves
    a flow run that is still running (a test that failed half way) alive; its environment names it.
    """
    wanted = {f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() for flow_run_id in flow_run_ids}
    sessions = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = set(environ.read_bytes().split(b"\0"))
        except OSError:
            continue
        if variables & wanted:
            sessions.add(os.getsid(int(environ.parent.name)))
    for sid in sessions - {os.getsid(0)}:
        kill_session(sid)


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of session ``sid`` at once, as a node loss would; returns their pids.

    A process worker starts each flow run in a session of its own (supervisor, engine, task
    processes), so this is exactly the flow run's process tree.
    """
    if sid == os.getsid(0):
        raise AssertionError(f"session {sid} is this test process's own session: the flow run was not isolated")
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
            members.append(int(stat.parent.name))
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return members


def alive(pid: int, grace: float = 10.0) -> bool:
    """True if ``pid`` still runs ``grace`` seconds from now (a killed process may take a moment to go)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def store_damage(root: str = "s3://quantdag/artifacts") -> str:
    """``none``, or how many published objects of the store differ from their manifests and which.

    Every object with a manifest is compared with it (:meth:`ArtifactStore.check`); objects a
    killed writer left without a manifest do not exist for readers and are not counted.
    """
    from quantdag.runtime.store import MANIFEST, ArtifactRef, ArtifactStore

    store = ArtifactStore(root)
    store.fs.invalidate_cache()
    objects = f"{root.split('://', 1)[1]}/objects"
    manifests = [p for p in store.fs.find(objects) if p.endswith(f"/{MANIFEST}")] if store.fs.exists(objects) else []
    damaged = []
    for path in manifests:
        data = json.loads(store.fs.cat_file(path))
        ref = ArtifactRef(**{key: data[key] for key in ("uri", "sha256", "kind", "files", "meta")})
        if problems := store.check(ref):
            damaged.append(f"{ref.kind} {ref.sha256[:12]}: {problems[0]}")
    return f"none ({len(manifests)} objects checked)" if not damaged else (
        f"{len(damaged)} of {len(manifests)} objects damaged: {'; '.join(damaged[:3])}")


def stored_texts(service_dir: Path, s3_roots: list[str], max_bytes: int = 200 << 20) -> dict[str, str]:
    """Every file the stack keeps, as text: the service directory (Prefect and MLflow databases,
    service and worker logs, worker homes) and every object under ``s3_roots`` (MLflow artifacts,
    the artifact store and Prefect's results). Bytes are decoded as latin-1, so a secret written
    in any encoding-compatible way is found by a substring search."""
    import s3fs

    texts = {}
    for path in sorted(Path(service_dir).rglob("*")):
        if path.is_file() and path.stat().st_size <= max_bytes:
            texts[str(path)] = path.read_bytes().decode("latin-1")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for root in s3_roots:
        for key, info in fs.find(root.split("://", 1)[1], detail=True).items():
            if info["size"] <= max_bytes:
                texts[f"s3://{key}"] = fs.cat_file(key).decode("latin-1")
    return texts

