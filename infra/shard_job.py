"""The Kubernetes Job of one ``calibrate-shard`` flow run, rendered by Prefect's own code (no cluster).

A Kubernetes work pool (``infra/k8s/base-job-template.json``) runs each shard of a quantize run
with ``calibration_pool`` as a Job with one GPU. :func:`render_shard_job` builds that Job the way
the pool's worker does: ``KubernetesWorkerJobConfiguration.from_template_and_values`` (Prefect's
template rendering: variable defaults, then the deployment's and the run's job variables) and its
``prepare_for_flow_run`` (the flow run's id, name, labels, env and command put into the manifest).
:data:`SHARD_JOB_VARIABLES` are the shard deployment's own job variables (one GPU).

    python infra/shard_job.py --set image=registry.example.com/quantdag-worker:0.1.0 \\
        --set mlflow_tracking_uri=http://mlflow:5000 --set s3_endpoint_url=http://minio:9000 \\
        --set credentials_secret=quantdag-credentials           # prints the Job as JSON

Needs ``prefect-kubernetes`` (the Kubernetes worker's package; the ``test`` extra installs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

INFRA = Path(__file__).resolve().parent
TEMPLATE = INFRA / "k8s" / "base-job-template.json"
SHARD_JOB_VARIABLES_FILE = INFRA / "k8s" / "calibrate-shard.job-variables.json"


def shard_job_variables() -> dict[str, Any]:
    """The calibrate-shard deployment's job variables on a Kubernetes pool (one GPU per shard)."""
    return json.loads(SHARD_JOB_VARIABLES_FILE.read_text())


def render_shard_job(template: dict[str, Any], job_variables: dict[str, Any], flow_run: Any,
                     deployment: Any = None, flow: Any = None) -> dict[str, Any]:
    """The Job manifest a Kubernetes worker would create for ``flow_run``.

    Args:
        template: the work pool's base job template (``job_configuration`` + ``variables``).
        job_variables: the deployment's job variables merged with the run's (cluster values:
            ``image``, ``mlflow_tracking_uri``, ``s3_endpoint_url``, ``credentials_secret``).
        flow_run: the shard's Prefect ``FlowRun`` (its id and name go into the Job).
        deployment, flow: the run's deployment and flow (labels), when known.

    Returns:
        The ``batch/v1`` Job as a dict (``metadata``, ``spec.template.spec.containers[0]``...).

    Raises:
        ImportError: ``prefect-kubernetes`` is not installed.
        pydantic.ValidationError: the rendered configuration is not a valid Kubernetes job
            configuration (a required variable left unset, a wrong type).
    """
    from prefect.client.orchestration import PrefectClient
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    # the client is only called for {{ prefect.blocks.* }} / {{ prefect.variables.* }} references (the
    # server's); without PREFECT_API_URL it points at the default local server and is never opened here
    client = PrefectClient(api=PREFECT_API_URL.value() or "http://127.0.0.1:4200/api")
    configuration = run_coro_as_sync(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=client))
    configuration.prepare_for_flow_run(flow_run, deployment=deployment, flow=flow)
    return configuration.job_manifest


def example_flow_run(label: str = "text[1]", attempt: int = 0) -> Any:
    """A ``FlowRun`` named as the quantize flow names shard runs (``calibrate-shard-<label>-<attempt>``)."""
    from prefect.client.schemas.objects import FlowRun

    return FlowRun(id=uuid.uuid4(), name=f"calibrate-shard-{label}-{attempt}", flow_id=uuid.uuid4(),
                   parameters={"attempt": attempt})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print the Kubernetes Job of one calibrate-shard flow run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a job variable (JSON values are parsed: gpu_count=2)")
    args = parser.parse_args(argv)
    values = shard_job_variables()
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    job = render_shard_job(json.loads(TEMPLATE.read_text()), values, example_flow_run())
    json.dump(job, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
