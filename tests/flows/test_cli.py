"""The ``quantdag`` command leaves nothing behind when killed and never prints a credential."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fault_rows import fault_row
from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import time
from flows.cli import temporary_prefect_api
with temporary_prefect_api() as url:
    print(url, flush=True)
    time.sleep(600)
"""
PLANTED = "quantdag-PLANTED-password-4711"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the command, its server and anything they started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the server process")
def test_temporary_api_ends_with_its_parent_on_kill_9(tmp_path: Path, prefect_api: str, service_dir: Path,
                                                      request) -> None:
    import sqlite3

    row = fault_row(request, "kill -9 of `quantdag run` (temporary Prefect API)",
                    "the temporary API process ends with its parent: no orphan server")
    home = tmp_path / "prefect-home"
    home.mkdir()
    # a copy of the session server's database: already migrated, so the temporary API starts in seconds
    with sqlite3.connect(service_dir / "prefect-home" / "prefect.db") as source, sqlite3.connect(home / "prefect.db") as copy:
        source.backup(copy)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    parent = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        url = parent.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and _answers(url), f"no temporary API came up: {url!r}"
        (server,) = _children(parent.pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"the temporary API (pid {server}) outlived its killed parent"
        assert not _answers(url)
        deadline = time.monotonic() + 10
        while _session(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _session(parent.pid), f"processes the server started outlived it: {_session(parent.pid)}"
        row.observed(f"server pid {server} ended {20 - (deadline - time.monotonic()):.1f} s after the kill")
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_credential_in_a_profile_url_is_refused_and_never_printed(monkeypatch: pytest.MonkeyPatch, request) -> None:
    row = fault_row(request, "credential in tracking_uri (quantdag run)",
                    "refused at validation (exit 2), masked in the error, the fix named; no run is created")
    runner = CliRunner()
    done = runner.invoke(app, ["run", "demo", "--set", f"tracking_uri=http://quantdag:{PLANTED}@127.0.0.1:9"])
    output = done.output + (done.stderr if done.stderr_bytes is not None else "")
    assert done.exit_code == 2, output
    assert PLANTED not in output
    assert "tracking_uri holds a credential in its URL (http://***@127.0.0.1:9)" in output
    assert "MLFLOW_TRACKING_PASSWORD" in output and all(line.startswith("error: ") for line in output.splitlines() if line)

    monkeypatch.setenv("PASSWORD", PLANTED)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://quantdag:${PASSWORD}@127.0.0.1:9".replace("${PASSWORD}", PLANTED))
    again = runner.invoke(app, ["run", "demo"])
    assert again.exit_code == 2 and PLANTED not in again.output + (again.stderr if again.stderr_bytes is not None else "")
    row.observed("exit 2: error: ... tracking_uri holds a credential in its URL (http://***@127.0.0.1:9) ...")
