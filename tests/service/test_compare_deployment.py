"""The compare flow as a service: ``prefect deployment run compare/demo-recipes`` on the process worker.

The shipped ``prefect.yaml`` deploys it with three recipes; the run goes through the worker like a
quantize run, validates its recipes against the schema, and records one MLflow parent with a child
per recipe.
"""

from __future__ import annotations

import json
import re

import pytest
from harness import Stack, cli, wait_for

pytestmark = pytest.mark.slow

DEPLOYMENT = "compare/demo-recipes"


def test_compare_deployment_runs_every_recipe_on_one_calibration(stack: Stack) -> None:
    deployed = json.loads(cli("deployment", "inspect", DEPLOYMENT, "--output", "json", env=stack.cli_env).stdout)
    names = [recipe["name"] for recipe in deployed["parameters"]["recipes"]]
    assert names == ["nvfp4-max", "lh-fp8-attention", "w4a16-mse"]

    done = cli("deployment", "run", DEPLOYMENT, env=stack.cli_env)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
    stack.flow_runs.append(flow_run_id)
    run = wait_for(flow_run_id, timeout=420)
    assert run.state.type.value == "COMPLETED", run.state.message
    result = stack.flow_result(run)
    assert {row["recipe"] for row in result["rows"]} == set(names)
    calibrations = {step: hit for step, hit in result["cached"].items() if "/calibrate_" in step}
    # one calibration for all: the first recipe's is computed (or Cached from an earlier run of the same
    # demo on this stack), every other recipe's is a cache hit of it
    assert [step for step in calibrations if step.startswith("nvfp4-max/")], calibrations
    assert all(hit for step, hit in calibrations.items() if not step.startswith("nvfp4-max/")), calibrations
    (parent,) = stack.parent_runs(flow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["flow"] == "compare"

    bad = cli("deployment", "run", DEPLOYMENT, "--param", 'recipes=[{"name": "x", "formats": {"mlp": "int3"}}]',
              env=stack.cli_env, check=False)
    assert bad.returncode != 0 and "mlp" in bad.stdout + bad.stderr, "the server validates recipes against the schema"
