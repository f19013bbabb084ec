"""k8s/ variants and components: each variant sets its own image, components combine, the GPU variant schedules on
a cluster with exactly as many GPUs as replicas, the single-node and local variants fit the clusters they name,
and a re-apply never meets a finished Job."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.files import (
    ADAPTER_RULES,
    K8S,
    KUBERNETES_VERSION,
    REPO,
    base_config,
    component_dirs,
    container,
    kustomization_files,
    kustomization_with,
    one,
    pod_containers,
    render,
    setting_env_names,
    settings_from_env,
    yaml_doc,
)
from trainer.__main__ import build_parser

GPU = "nvidia.com/gpu"
# What a default minikube node (2 CPUs) has left once its control plane and CoreDNS hold their requests
# (apiserver 250m, controller-manager 200m, scheduler 100m, etcd 100m, CoreDNS 100m).
LOCAL_NODE_FREE_CPU_M = 2000 - 750


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in {"Deployment", "Job"}]


def _images(objects: list[dict[str, Any]]) -> set[str]:
    return {c["image"] for w in _workloads(objects) for c in pod_containers(w["spec"]["template"]["spec"])}


def _cpu_m(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def _pod_request_cpu_m(pod: dict[str, Any]) -> int:
    """The scheduler's view of a pod: the larger of its largest init container and the sum of its containers."""
    init = [_cpu_m(c["resources"]["requests"]["cpu"]) for c in pod.get("initContainers", [])]
    main = sum(_cpu_m(c["resources"]["requests"]["cpu"]) for c in pod["containers"])
    return max([main, *init])


def _gpus(pod: dict[str, Any]) -> int:
    return sum(int(c["resources"].get("limits", {}).get(GPU, 0)) for c in pod_containers(pod))


def _set_image(kustomization: Path, image: str) -> None:
    """What `kustomize edit set image digit-service=<image>` does to the kustomization in that directory."""
    spec = yaml_doc(kustomization)
    name, tag = image.rsplit(":", 1)
    entries = [entry for entry in spec.get("images", []) if entry["name"] != "digit-service"]
    spec["images"] = [*entries, {"name": "digit-service", "newName": name, "newTag": tag}]
    kustomization.write_text(yaml.safe_dump(spec), encoding="utf-8")


# --- images, per variant --------------------------------------------------------------------------


def test_the_shared_base_names_no_image_tag() -> None:
    # An image set in the base (as the README once said) renamed the image before the GPU overlay's tag could
    # match it, and CUDA pods got the CPU image.
    assert "images" not in yaml_doc(K8S / "base" / "kustomization.yaml")


def test_setting_each_variants_image_reaches_only_that_variants_pods(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    _set_image(copy / "kustomization.yaml", "registry.example.com/digit-service:1.2.3-cpu")
    _set_image(copy / "variants" / "gpu" / "kustomization.yaml", "registry.example.com/digit-service:1.2.3-cuda")
    assert _images(render(copy)) == {"registry.example.com/digit-service:1.2.3-cpu"}
    assert _images(render(copy / "variants" / "gpu")) == {"registry.example.com/digit-service:1.2.3-cuda"}


def test_the_readme_sets_images_in_the_variants_never_in_the_base() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^.*kustomize edit set image.*$", readme, re.M)
    assert commands, "the README says how to set the image"
    for command in commands:
        assert "k8s/base" not in command, command


# --- components combine ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "components",
    [["gpu", "nvidia-runtime", "auth", "queue-depth"], ["single-node", "local", "auth", "queue-depth"]],
    ids=["+".join(["gpu", "nvidia-runtime", "auth", "queue-depth"]), "+".join(["single-node", "local", "auth"])],
)
def test_components_combine_into_one_valid_deployment(components: list[str], tmp_path: Path) -> None:
    objects = render(kustomization_with(tmp_path, components))
    assert [o["kind"] for o in objects].count("Namespace") == 1
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    config = one(objects, "ConfigMap")["data"]
    assert {"DIGIT_API_TOKENS_FILE", "DIGIT_ADMIN_TOKENS_FILE"} <= config.keys(), "auth"
    metrics = {m["type"] for m in one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert metrics == {"Pods", "Resource"}, "queue-depth"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "tokens" in {v["name"] for v in pod["volumes"]}


def test_every_component_is_a_kustomize_component() -> None:
    names = {path.name for path in component_dirs()}
    assert names == {"gpu", "nvidia-runtime", "auth", "queue-depth", "single-node", "local"}
    for path in kustomization_files():
        spec = yaml_doc(path)
        if spec["kind"] == "Component":
            assert "resources" not in spec and "namespace" not in spec, f"{path}: a component adds no base"


def test_auth_mounts_the_token_secret_where_the_settings_point(tmp_path: Path) -> None:
    objects = render(kustomization_with(tmp_path, ["auth"]))
    settings = one(objects, "ConfigMap")["data"]
    token_files = {key: value for key, value in settings.items() if key.endswith("_TOKENS_FILE")}
    assert set(token_files) == {"DIGIT_API_TOKENS_FILE", "DIGIT_ADMIN_TOKENS_FILE"} <= setting_env_names()
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in container(pod, "api")["volumeMounts"] if m["name"] == "tokens"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tokens"]
    assert volume["secret"]["secretName"] == "digit-api-tokens"
    for path in token_files.values():
        assert path.startswith(mount["mountPath"] + "/")


def test_queue_depth_scales_on_the_queue_and_cpu(tmp_path: Path) -> None:
    hpa = one(render(kustomization_with(tmp_path, ["queue-depth"])), "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "digit_queue_depth"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    target = int(metrics["Pods"]["pods"]["target"]["averageValue"])
    assert 0 < target <= int(base_config()["DIGIT_MAX_BATCH_SIZE"]), "more than a batch waiting = saturated"


# --- GPUs -----------------------------------------------------------------------------------------


def _gpu_variant() -> list[dict[str, Any]]:
    return render(K8S / "variants" / "gpu")


def test_gpu_variant_puts_the_api_on_a_gpu_with_the_cuda_image() -> None:
    objects = _gpu_variant()
    assert settings_from_env(one(objects, "ConfigMap")["data"]).device == "cuda"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    api = container(pod, "api")
    assert api["resources"]["limits"][GPU] == 1
    assert api["image"].endswith("-cuda")
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert api["resources"]["requests"]["cpu"], "the base's requests survive the merge"


def test_gpu_variant_leaves_room_in_memory_for_a_cuda_context() -> None:
    api = container(one(_gpu_variant(), "Deployment")["spec"]["template"]["spec"], "api")
    cpu_api = container(one(render(K8S), "Deployment")["spec"]["template"]["spec"], "api")
    gib = {"Gi": 1.0, "Mi": 1 / 1024}
    limit, cpu_limit = (
        float(c["resources"]["limits"]["memory"][:-2]) * gib[c["resources"]["limits"]["memory"][-2:]]
        for c in (api, cpu_api)
    )
    assert limit >= cpu_limit + 1, "a CUDA context takes about 1 GiB of host memory on top of the CPU footprint"


def test_a_cluster_with_one_gpu_per_replica_runs_the_gpu_variant() -> None:
    # API pods hold their GPUs while their init container waits for the model; a trainer Job that needed a GPU
    # too could never run on a cluster with exactly minReplicas GPUs (deadlock), and a rollout with maxSurge 1
    # needed one more.
    objects = _gpu_variant()
    deployment = one(objects, "Deployment")
    per_replica = _gpus(deployment["spec"]["template"]["spec"])
    min_replicas = one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    job_gpus = _gpus(one(objects, "Job")["spec"]["template"]["spec"])
    assert per_replica == 1
    peak = (min_replicas + surge) * per_replica + job_gpus
    assert peak <= min_replicas, f"needs {peak} GPUs at once on a cluster of {min_replicas}"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] >= 1, "the rollout can progress"


def test_the_gpu_variants_trainer_job_seeds_and_verifies_without_a_gpu() -> None:
    job = one(_gpu_variant(), "Job")
    trainer = container(job["spec"]["template"]["spec"], "trainer")
    args = build_parser().parse_args(trainer["command"][3:])
    assert args.skip_existing and args.device != "cuda"


def test_the_nvidia_runtime_class_is_an_option(tmp_path: Path) -> None:
    plain = one(_gpu_variant(), "Deployment")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in plain
    objects = render(kustomization_with(tmp_path, ["gpu", "nvidia-runtime"], "digit-service:0.1.0-cuda"))
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


# --- storage and local clusters -------------------------------------------------------------------


def test_single_node_uses_read_write_once_and_keeps_every_pod_on_the_volumes_node(tmp_path: Path) -> None:
    objects = render(kustomization_with(tmp_path, ["single-node"]))
    assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    for workload in _workloads(objects):
        template = workload["spec"]["template"]
        (term,) = template["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        for other in _workloads(objects):
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert term["labelSelector"]["matchLabels"].items() <= labels.items(), "together with every pod"


def test_the_base_claim_documents_its_storage_class() -> None:
    text = (K8S / "base" / "pvc.yaml").read_text(encoding="utf-8")
    assert "storageClassName" in text and "components/single-node" in text


def test_the_trainer_job_fits_a_two_cpu_node() -> None:
    job = one(render(K8S), "Job")
    assert _pod_request_cpu_m(job["spec"]["template"]["spec"]) <= LOCAL_NODE_FREE_CPU_M // 2


def test_the_local_variant_fits_a_default_minikube_node() -> None:
    objects = render(K8S / "variants" / "local")
    deployment = one(objects, "Deployment")
    api_m = deployment["spec"]["replicas"] * _pod_request_cpu_m(deployment["spec"]["template"]["spec"])
    job_m = _pod_request_cpu_m(one(objects, "Job")["spec"]["template"]["spec"])
    assert api_m + job_m <= LOCAL_NODE_FREE_CPU_M
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert one(objects, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"], "local-path"


def test_the_local_recipe_loads_the_image_the_local_variant_runs() -> None:
    (image,) = _images(render(K8S / "variants" / "local"))
    for workload in _workloads(render(K8S / "variants" / "local")):
        for spec in pod_containers(workload["spec"]["template"]["spec"]):
            assert spec["imagePullPolicy"] == "IfNotPresent", "a loaded image is used, never pulled"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"docker build -t {image} ." in readme
    assert f"kind load docker-image {image}" in readme and f"minikube image load {image}" in readme


# --- re-applying, and the adapter rule --------------------------------------------------------------


def test_a_finished_trainer_job_is_gone_before_the_next_apply() -> None:
    # A finished Job's pod template is immutable: left in place (it was kept a day), it made the next
    # `kubectl apply -k` with another image fail.
    for directory in (K8S, K8S / "variants" / "gpu", K8S / "variants" / "local"):
        assert one(render(directory), "Job")["spec"]["ttlSecondsAfterFinished"] == 0, directory


def test_the_adapter_rule_is_merged_never_applied() -> None:
    header = [line for line in ADAPTER_RULES.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    instructions = [line for line in header if re.search(r"kubectl (apply|replace|create)\b", line)]
    assert not instructions, f"applying the file replaces the adapter's whole ConfigMap: {instructions}"
    assert any("merge" in line.lower() for line in header)
    for path in kustomization_files():
        assert ADAPTER_RULES.name not in yaml.safe_dump(yaml_doc(path)), f"{path} applies the adapter rule"
