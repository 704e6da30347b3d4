"""The Kubernetes manifests and the Ray Serve config agree with the schemas and the code.

Plain resources (Deployment, Service, HPA, PDB, PVC) are validated strictly against the
Kubernetes OpenAPI schemas that `kubernetes-validate` bundles (offline). KubeRay's RayService is a
CRD with no bundled schema: its pod templates are validated as core `PodTemplate`s, its fields
against the CRD's required ones (ray.io/v1: `spec.rayClusterConfig.headGroupSpec.{rayStartParams,
template}`, each worker group's `groupName`, `maxReplicas`, `rayStartParams`, `template`), and its
`serveConfigV2` with Ray Serve's own config schema and the application builder.
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.ray_app import ScaleOptions, build_app, deployment_options, split_args
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
SERVE_CONFIG = ROOT / "docker" / "ray-serve.yaml"
K8S_VERSION = kubernetes_validate.latest_version()
PREFIX = "SONAR_LLM_"
SETTING_NAMES = {PREFIX + name.upper() for name in Settings.model_fields}
GRACE = Settings.model_fields["shutdown_grace"].default


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one resource per kind"
    return kinds


def validate(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def image_uid() -> str:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    return users[-1].split(":")[0]


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    """The real app before its model loads (no lifespan): its routes and metric names."""
    return TestClient(create_app(Settings()))


@pytest.fixture(scope="module")
def plain() -> dict[str, dict[str, Any]]:
    return by_kind(documents("deployment.yaml"))


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    (doc,) = documents("rayservice.yaml")
    return doc


# ---------------------------------------------------------------------------------------------
# without KubeRay: Deployment, Service, HPA, PDB (+ the cache PVC)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deployment.yaml", "model-cache-pvc.yaml"])
def test_plain_resources_match_the_kubernetes_schemas(name: str) -> None:
    for resource in documents(name):
        validate(resource)


def test_a_wrong_field_is_caught() -> None:
    """The validation is real: a misspelt field fails it."""
    (pvc,) = documents("model-cache-pvc.yaml")
    pvc["spec"]["accesModes"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(pvc)


def test_deployment_runs_one_gpu_server_per_pod(
    plain: dict[str, dict[str, Any]], app_client: TestClient
) -> None:
    pod = plain["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image_uid()
    assert pod["terminationGracePeriodSeconds"] > GRACE
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= SETTING_NAMES
    Settings(**{k.removeprefix(PREFIX).lower(): v for k, v in env.items()})  # valid values
    grace = float(env.get("SONAR_LLM_SHUTDOWN_GRACE", GRACE))
    assert pod["terminationGracePeriodSeconds"] > grace
    port = container["ports"][0]["containerPort"]
    assert port == Settings.model_fields["port"].default
    # readiness is readiness (503 before the model loads), liveness answers at once
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert app_client.get("/health/ready").status_code == 503
    for probe in ("livenessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert app_client.get(path).status_code == 200, probe
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/cache"
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == documents("model-cache-pvc.yaml")[0]["metadata"]["name"]


def test_service_hpa_and_pdb_select_the_deployment(
    plain: dict[str, dict[str, Any]], app_client: TestClient
) -> None:
    deployment = plain["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = plain["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {
        p["name"]: p["containerPort"]
        for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    for port in service["spec"]["ports"]:
        assert (
            port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()
        )
    pdb = plain["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = plain["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["maxReplicas"]
    # The HPA scales on a metric the server really exports.
    exported = app_client.get("/metrics").text
    for metric in hpa["spec"]["metrics"]:
        name = metric["pods"]["metric"]["name"]
        assert re.search(rf"^{name} ", exported, re.M), name
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) in container_ports.values()


# ---------------------------------------------------------------------------------------------
# KubeRay RayService and the Serve config
# ---------------------------------------------------------------------------------------------


def serve_apps(config: dict[str, Any]) -> list[dict[str, Any]]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    return list(config["applications"])


def check_app(app: dict[str, Any]) -> tuple[Settings, ScaleOptions]:
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("server.ray_app", "build_app")
    assert build_app.__name__ == attr
    return split_args(app["args"])  # every arg is a setting or a scale option, with valid values


def test_serve_config_file_is_a_valid_serve_config() -> None:
    pytest.importorskip("ray.serve")
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    (app,) = serve_apps(config)
    settings, scale = check_app(app)
    assert config["http_options"]["port"] == Settings.model_fields["port"].default
    options = deployment_options(settings, scale)
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["graceful_shutdown_timeout_s"] == settings.shutdown_grace


def test_rayservice_has_the_crd_required_fields(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert {"rayStartParams", "template"} <= set(head)
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert {"groupName", "maxReplicas", "rayStartParams", "template"} <= set(group)
        assert group.get("minReplicas", 0) <= group.get("replicas", 0) <= group["maxReplicas"]
    for value in [*head["rayStartParams"].values(), *groups[0]["rayStartParams"].values()]:
        assert isinstance(value, str), "rayStartParams values are strings in the CRD"
    assert cluster["rayVersion"] == version("ray")


def test_rayservice_pod_templates_match_the_kubernetes_schema(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]
    for template in templates:
        validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": template,
            }
        )
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert str(spec["securityContext"]["runAsUser"]) == image_uid()


def test_rayservice_serves_the_app_on_gpu_workers(
    rayservice: dict[str, Any], app_client: TestClient
) -> None:
    pytest.importorskip("ray.serve")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = serve_apps(config)
    settings, scale = check_app(app)
    options = deployment_options(settings, scale)
    cluster = rayservice["spec"]["rayClusterConfig"]
    (gpu,) = [
        g for g in cluster["workerGroupSpecs"] if float(g["rayStartParams"].get("num-gpus", 0))
    ]
    pod = gpu["template"]["spec"]
    (container,) = pod["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == float(gpu["rayStartParams"]["num-gpus"])
    per_replica = options["ray_actor_options"]["num_gpus"]
    assert per_replica == 1
    # enough GPU workers for the most replicas
    autoscaling = options["autoscaling_config"]
    assert gpu["maxReplicas"] * gpus >= autoscaling["max_replicas"] * per_replica
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace
    mount = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/cache"]
    claim = {v["name"]: v for v in pod["volumes"]}[mount]["persistentVolumeClaim"]["claimName"]
    assert claim == documents("model-cache-pvc.yaml")[0]["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": 8000}
    assert app_client.get("/health/ready").status_code == 503  # readiness, not liveness
    assert config["http_options"]["port"] == 8000
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == container["image"]
