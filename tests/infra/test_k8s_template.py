"""infra/k8s/base-job-template.json: a Prefect Kubernetes work-pool base job template.

Checked with Prefect's own code where it exists offline: the server-side template
validation (`WorkPoolCreate`), the worker's placeholder rendering (`apply_values`),
the job-variable schema validation, and the kubernetes worker's default template that
ships inside prefect (collections_data) for the keys the worker reads.
"""

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.schema_tools import validate as validate_job_variables

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "base-job-template.json"
REQUIRED = {
    "image": "registry.example.com/quantdag-worker:0.1.0",
    "mlflow_tracking_uri": "http://mlflow.quantdag.svc.cluster.local:5000",
    "s3_endpoint_url": "http://minio.quantdag.svc.cluster.local:9000",
    "credentials_secret": "quantdag-credentials",
}


@pytest.fixture(scope="module")
def template():
    return json.loads(TEMPLATE_PATH.read_text())


@pytest.fixture(scope="module")
def prefect_default():
    """The kubernetes worker's default base job template, as bundled with prefect."""
    path = resources.files("prefect.server.api.collections_data") / "views" / "aggregate-worker-metadata.json"
    data = json.loads(path.read_text())
    return data["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def _container(job_configuration):
    return job_configuration["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def test_placeholders_and_variables_match(validate, template):
    problems = validate.k8s_template_problems(template)
    assert not problems, "\n".join(problems)


def test_prefect_server_accepts_the_template(template):
    pool = WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template)
    assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_worker_keys_and_standard_variables_are_kept(template, prefect_default):
    assert set(template["job_configuration"]) == set(prefect_default["job_configuration"])
    missing = set(prefect_default["variables"]["properties"]) - set(template["variables"]["properties"])
    assert not missing, f"standard kubernetes variables dropped: {missing}"


def test_defaults_conform_to_their_schemas(template):
    variables = template["variables"]
    for name, prop in variables["properties"].items():
        if "default" in prop:
            schema = {**prop, "definitions": variables.get("definitions", {})}
            jsonschema.validate(prop["default"], schema)


def test_rendered_job_requests_a_gpu_node(validate, template):
    config = validate.render_job_configuration(template, REQUIRED)
    assert "{{" not in json.dumps(config), "unrendered placeholder left"
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    container = _container(config)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" not in container["resources"]["limits"], "an unset limit must be dropped, not rendered empty"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == REQUIRED["image"]
    assert pod["securityContext"]["runAsNonRoot"] is True

    four = validate.render_job_configuration(template, {**REQUIRED, "gpu_count": 4})
    assert _container(four)["resources"]["limits"]["nvidia.com/gpu"] == 4


def test_hf_cache_volume_is_mounted(validate, template):
    config = validate.render_job_configuration(template, REQUIRED)
    pod = config["job_manifest"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in _container(config)["volumeMounts"]}
    assert set(mounts) <= set(volumes), f"mounts without a volume: {set(mounts) - set(volumes)}"
    assert "emptyDir" in volumes["cache"] and mounts["cache"] == "/cache"
    env = {e["name"]: e.get("value") for e in _container(config)["env"]}
    assert env["HF_HOME"].startswith(mounts["cache"] + "/")


def test_env_carries_mlflow_and_s3_settings_and_no_secret(validate, template):
    config = validate.render_job_configuration(template, REQUIRED)
    container = _container(config)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == REQUIRED["mlflow_tracking_uri"]
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == REQUIRED["s3_endpoint_url"]
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert container["envFrom"] == [{"secretRef": {"name": REQUIRED["credentials_secret"]}}]
    inline = [n for n in env if validate.SECRET_NAME.search(n)]
    assert not inline, f"credentials inline in the template: {inline}"


def test_prefect_env_passes_through_the_env_variable(validate, template):
    """The worker adds its PREFECT_* settings to `env`; a deployment may override them."""
    api = {"PREFECT_API_URL": "http://prefect-server.quantdag.svc.cluster.local:4200/api"}
    config = validate.render_job_configuration(template, {**REQUIRED, "env": api})
    assert config["env"] == api


def test_flow_run_without_required_variables_is_refused(template):
    """What the server does when a flow run is created (required keys enforced)."""
    errors = validate_job_variables({}, template["variables"], ignore_required=False)
    missing = {e.message.split("'")[1] for e in errors if e.validator == "required"}
    assert missing == set(REQUIRED), [e.message for e in errors]
    assert validate_job_variables(dict(REQUIRED), template["variables"], ignore_required=False) == []


def test_checks_catch_a_broken_template(validate, template):
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpu_count"]
    broken["variables"]["properties"]["unused"] = {"type": "string"}
    del _container(broken["job_configuration"])["resources"]["limits"]["nvidia.com/gpu"]
    problems = "\n".join(validate.k8s_template_problems(broken))
    assert "variable unused is declared but never used" in problems
    assert "nvidia.com/gpu" in problems
    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["gpu_count"]
    problems = "\n".join(validate.k8s_template_problems(broken))
    assert "{{ gpu_count }} has no variables.properties entry" in problems
    with pytest.raises(ValueError, match="gpu_count"):
        WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=broken)
