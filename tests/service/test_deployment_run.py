"""``quantdag deployment-run``: a deployment run with a dotted-key override, followed like
``prefect deployment run --watch``, whose failure ends with the error line instead of a state name."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from harness import BIN, REPO, Stack, read_flow_run

pytestmark = pytest.mark.slow


def test_a_failed_run_ends_with_its_error_line(stack: Stack) -> None:
    done = subprocess.run([str(BIN / "quantdag"), "deployment-run", "quantize/demo", "--set", "eval.max_windows=0"],
                          cwd=REPO, env={**os.environ, **stack.cli_env}, capture_output=True, text=True, timeout=400)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    flow_run_id = re.search(r"\(([0-9a-f-]{36})\) of quantize/demo", done.stdout).group(1)
    stack.flow_runs.append(flow_run_id)
    assert read_flow_run(flow_run_id).parameters["overrides"] == {"eval.max_windows": "0"}
    (end,) = [i for i, line in enumerate(lines) if "finished in state 'Failed'" in line]
    error = "\n".join(lines[end:-1])
    assert "ValueError" in error and "eval.max_windows: Input should be greater than 0" in error, (
        f"the run's output ends with the reason, not only the state:\n{error}")
    assert lines[-1] == f"the whole log: prefect flow-run logs {flow_run_id}"
