"""The Kubernetes Job of a calibrate-shard flow run, rendered by the Kubernetes worker's own code.

``prefect-kubernetes``' ``KubernetesWorkerJobConfiguration`` renders the work pool's base job
template with the shard deployment's job variables and prepares it for a flow run exactly as the
worker does before it creates the Job; its validator also checks the manifest against the
worker's required Job shape.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import _load

pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes (the test extra) renders the Job")

CLUSTER = {
    "image": "registry.example.com/quantdag-worker:0.1.0",
    "mlflow_tracking_uri": "http://mlflow.quantdag.svc.cluster.local:5000",
    "s3_endpoint_url": "http://minio.quantdag.svc.cluster.local:9000",
    "credentials_secret": "quantdag-credentials",
}
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
"""Kubernetes names (DNS-1123 labels) and label values (at most 63 characters each)."""


@pytest.fixture(scope="module")
def shard_job():
    return _load("shard_job")


@pytest.fixture(scope="module")
def rendered(shard_job):
    run = shard_job.example_flow_run("image_text[1]+text[1]", attempt=2)
    template = json.loads(shard_job.TEMPLATE.read_text())
    return run, shard_job.render_shard_job(template, {**shard_job.shard_job_variables(), **CLUSTER}, run)


def test_shard_job_runs_its_flow_run_on_one_gpu(rendered) -> None:
    run, job = rendered
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}, "one GPU per shard, no other limit rendered"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"] == str(run.id), "the Job executes exactly this shard's flow run"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert env["AWS_ENDPOINT_URL"] == CLUSTER["s3_endpoint_url"], "states travel through the artifact store (S3)"
    assert container["envFrom"] == [{"secretRef": {"name": CLUSTER["credentials_secret"]}}]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0, \
        "a failed shard is retried by the quantize flow as a new flow run, never by Kubernetes"
    assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(run.id)
    assert job["metadata"]["labels"]["quantdag/step"] == "calibrate-shard"


def test_shard_labels_become_valid_kubernetes_names(rendered) -> None:
    run, job = rendered
    name = job["metadata"]["generateName"].rstrip("-")
    assert DNS_1123.match(name) and len(name) <= 63, f"{name!r} is no valid Job name (from flow run {run.name!r})"
    bad = {key: value for key, value in job["metadata"]["labels"].items()
           if not LABEL_VALUE.match(value) or len(value) > 63}
    assert not bad, f"label values Kubernetes refuses: {bad}"


def test_shard_variables_alone_are_refused_until_the_cluster_values_are_set(shard_job) -> None:
    """Rendering would fall back to Prefect's stock image; the server refuses such a run (required variables)."""
    from prefect.utilities.schema_tools import validate as validate_job_variables

    variables = json.loads(shard_job.TEMPLATE.read_text())["variables"]
    errors = validate_job_variables(shard_job.shard_job_variables(), variables, ignore_required=False)
    assert {e.message.split("'")[1] for e in errors if e.validator == "required"} == set(CLUSTER)
    assert validate_job_variables({**shard_job.shard_job_variables(), **CLUSTER}, variables, ignore_required=False) == []
