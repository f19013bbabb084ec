"""k8s/: every manifest matches the Kubernetes schemas, the kustomizations render, and the objects agree
with each other and with the code (routes, port, settings, command lines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.config import Settings
from tests.deploy.files import (
    K8S,
    KUBERNETES_VERSION,
    REPO,
    adapter_rules,
    base_config,
    base_objects,
    container,
    env_file,
    kustomization_files,
    manifest_files,
    mount_path,
    one,
    partial_schema_errors,
    patch_files,
    pod_containers,
    render,
    setting_env_names,
    settings_from_env,
    variant_dirs,
    yaml_doc,
    yaml_docs,
)
from trainer.__main__ import build_parser

VARIANTS = sorted(variant_dirs())


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _routes() -> set[str]:
    """GET routes of the app, from its OpenAPI schema (the lifespan does not run: no model is loaded)."""
    paths = create_app(Settings(), metrics_registry=CollectorRegistry()).openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


def _deployment() -> dict[str, Any]:
    return base_objects()[("Deployment", "digit-api")]


def _job() -> dict[str, Any]:
    return base_objects()[("Job", "digit-trainer")]


# --- schemas and kustomizations -----------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=_id)
def test_every_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    is_patch = path in patch_files()
    for obj in yaml_docs(path):
        if is_patch:
            assert partial_schema_errors(obj) == [], f"{_id(path)} (a patch)"
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", kustomization_files(), ids=_id)
def test_kustomization_references_exist(kustomization: Path) -> None:
    spec = yaml_doc(kustomization)
    root = kustomization.parent
    for resource in spec.get("resources", []):
        target = root / resource
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{_id(kustomization)}: {resource}"
    for patch in spec.get("patches", []):
        assert (root / patch["path"]).is_file(), f"{_id(kustomization)}: patch {patch['path']}"
    for generator in spec.get("configMapGenerator", []):
        for env in generator.get("envs", []):
            assert (root / env).is_file(), f"{_id(kustomization)}: env file {env}"


@pytest.mark.parametrize("patch", patch_files(), ids=_id)
def test_patches_name_objects_of_the_base(patch: Path) -> None:
    targets = base_objects()
    for obj in yaml_docs(patch):
        assert (obj["kind"], obj["metadata"]["name"]) in targets, f"{_id(patch)} patches nothing in k8s/base"
        base = targets[(obj["kind"], obj["metadata"]["name"])]
        patched = obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        names = {c["name"] for c in base.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])}
        assert {c["name"] for c in patched} <= names, f"{_id(patch)}: containers are merged by name"


def test_the_top_level_kustomization_applies_the_base() -> None:
    assert yaml_doc(K8S / "kustomization.yaml")["resources"] == ["base"]


@pytest.mark.parametrize("directory", VARIANTS, ids=_id)
def test_kustomization_renders_and_every_object_matches_the_schema(directory: Path) -> None:
    objects = render(directory)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "digit", f"{obj['kind']}/{obj['metadata']['name']}"
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "Namespace",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
        ]
    )
    config_map = one(objects, "ConfigMap")
    (reference,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert reference["configMapRef"]["name"] == config_map["metadata"]["name"], "kustomize renamed both (hash suffix)"


# --- the ConfigMap against the code ---------------------------------------------------------------


def test_configmap_keys_are_real_settings_with_valid_values() -> None:
    config = base_config()
    unknown = set(config) - setting_env_names()
    assert not unknown, f"not settings of service/config.py: {sorted(unknown)}"
    settings = settings_from_env(config)
    assert settings.host == "0.0.0.0", "in a pod the service must listen beyond loopback"
    assert settings.port == Settings.model_fields["port"].default == 8000


def test_env_files_hold_only_settings() -> None:
    for path in K8S.rglob("*.env"):
        assert set(env_file(path)) <= setting_env_names(), _id(path)


# --- the Deployment -------------------------------------------------------------------------------


def test_deployment_runs_the_service_command_on_the_configmap_port() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    api = container(pod, "api")
    assert api["command"] == ["python", "-m", "service"]
    (port,) = api["ports"]
    assert port["containerPort"] == int(base_config()["DIGIT_PORT"]) == Settings.model_fields["port"].default
    assert api["envFrom"] == [{"configMapRef": {"name": "digit-service-config"}}]
    assert mount_path(api, "artifacts") == base_config()["DIGIT_ARTIFACT_DIR"]


def test_deployment_probes_hit_real_routes_on_the_container_port() -> None:
    api = container(_deployment()["spec"]["template"]["spec"], "api")
    routes = _routes()
    named_ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    probes = {kind: api[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in routes, f"{kind}: {probe['path']} is not a route of the app"
        assert named_ports[probe["port"]] == 8000


def test_deployment_scales_out_and_rolls_without_losing_capacity() -> None:
    deployment = _deployment()
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_deployment_drains_within_its_grace_period() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    api = container(pod, "api")
    sleep_command = api["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep_command[0] == "sleep"
    pre_stop_s = int(sleep_command[1])
    assert pre_stop_s >= 3, "give endpoints and load balancers time to stop sending"
    timeout_s = settings_from_env(base_config()).request_timeout_s
    # service/__main__.py: uvicorn drains requests for request_timeout_s + 5 s, then the batcher for request_timeout_s
    worst_case_s = pre_stop_s + (int(timeout_s) + 5) + timeout_s
    assert pod["terminationGracePeriodSeconds"] >= worst_case_s


def test_pods_are_locked_down() -> None:
    for pod in (_deployment()["spec"]["template"]["spec"], _job()["spec"]["template"]["spec"]):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001, "the image's USER"
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for spec in pod_containers(pod):
            context = spec["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, spec["name"]
            assert context["readOnlyRootFilesystem"] is True, spec["name"]
            assert context["capabilities"]["drop"] == ["ALL"], spec["name"]
            assert spec["resources"]["requests"] and spec["resources"]["limits"], spec["name"]
            assert {"cpu", "memory"} <= spec["resources"]["limits"].keys(), spec["name"]
            for mount in spec.get("volumeMounts", []):
                assert mount["name"] in volumes
        api_or_trainer = pod["containers"][0]
        tmp = [m for m in api_or_trainer["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], "a writable /tmp on a read-only root"


def test_api_pods_mount_the_artifacts_read_only_and_wait_for_a_valid_model() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["artifacts"]["persistentVolumeClaim"] == {"claimName": "digit-artifacts", "readOnly": True}
    for spec in pod_containers(pod):
        (mount,) = [m for m in spec["volumeMounts"] if m["name"] == "artifacts"]
        assert mount["readOnly"] is True
    (wait,) = pod["initContainers"]
    assert "find_valid_version" in wait["command"][-1]
    assert wait["envFrom"] == container(pod, "api")["envFrom"]


def test_deployment_is_annotated_for_prometheus() -> None:
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == 8000
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "/metrics" in _routes()
    assert settings_from_env(base_config()).metrics_enabled


# --- Service, HPA, PDB, PVC, Job ------------------------------------------------------------------


def test_service_selects_the_api_pods_and_targets_the_http_port() -> None:
    service = base_objects()[("Service", "digit-api")]
    pod_template = _deployment()["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod_template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    api = container(pod_template["spec"], "api")
    assert port["targetPort"] in {p["name"] for p in api["ports"]} | {p["containerPort"] for p in api["ports"]}


def test_hpa_scales_the_deployment_on_cpu_and_keeps_two_replicas() -> None:
    hpa = base_objects()[("HorizontalPodAutoscaler", "digit-api")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in base_objects()
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    api = container(_deployment()["spec"]["template"]["spec"], "api")
    assert "cpu" in api["resources"]["requests"], "CPU utilisation is measured against the request"


def test_pdb_covers_the_api_pods() -> None:
    pdb = base_objects()[("PodDisruptionBudget", "digit-api")]
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < _deployment()["spec"]["replicas"]


def test_artifact_claim_is_shared_by_the_job_and_every_api_replica() -> None:
    pvc = base_objects()[("PersistentVolumeClaim", "digit-artifacts")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "replicas on several nodes read what the Job wrote"
    for workload in (_deployment(), _job()):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == "digit-artifacts"


def test_trainer_job_command_parses_with_the_trainer_cli() -> None:
    pod = _job()["spec"]["template"]["spec"]
    trainer = container(pod, "trainer")
    command = trainer["command"]
    assert command[:3] == ["python", "-m", "trainer"]
    args = build_parser().parse_args(command[3:])
    assert args.command == "train"
    assert args.skip_existing, "a valid artifact must not be retrained on every apply"
    assert str(args.output_dir) == mount_path(trainer, "artifacts") == base_config()["DIGIT_ARTIFACT_DIR"]
    assert args.model_name == base_config()["DIGIT_MODEL_NAME"]
    assert {"name": "MNIST_DATA_DIR", "value": mount_path(trainer, "mnist-data")} in trainer["env"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}


def test_trainer_job_seeds_the_volume_first() -> None:
    pod = _job()["spec"]["template"]["spec"]
    (seed,) = pod["initContainers"]
    program, source, target = seed["command"]
    assert program == "seed-artifacts"
    assert target == mount_path(container(pod, "trainer"), "artifacts")
    assert source == "/app/artifacts"


def test_adapter_rule_serves_the_metric_the_hpa_reads() -> None:
    hpa = yaml_doc(K8S / "components" / "queue-depth" / "hpa-queue-depth.yaml")
    (pods_metric,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    (rule,) = adapter_rules()
    assert rule["name"]["as"] == pods_metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "per-pod metric for a Pods HPA metric"


def test_manifests_use_the_image_name_every_variant_sets() -> None:
    images = {
        spec["image"]
        for obj in base_objects().values()
        if obj["kind"] in {"Deployment", "Job"}
        for spec in pod_containers(obj["spec"]["template"]["spec"])
    }
    for directory in VARIANTS:
        (image,) = yaml_doc(directory / "kustomization.yaml")["images"]
        assert images == {image["name"]}, _id(directory)
