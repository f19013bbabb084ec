"""The deployment files, loaded for the tests, and the small parsers the tests share."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import dockerfile
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from service.config import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
K8S_BASE = K8S / "base"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "digit-service.json"
ADAPTER_RULES = K8S / "components" / "queue-depth" / "prometheus-adapter-rules.yaml"
SEED_SCRIPT = REPO / "deploy" / "seed-artifacts.sh"
ARTIFACTS = REPO / "artifacts"

# The Kubernetes version whose schemas the manifests are checked against: the newest that kubernetes-validate
# (>= 1.37.0, see pyproject.toml) ships. The manifests use only GA APIs (apps/v1, batch/v1, autoscaling/v2,
# policy/v1), so they also apply to older clusters back to 1.25 (Pod Security admission GA).
KUBERNETES_VERSION = "1.37.0"

# Labels Prometheus puts on every scraped series (target labels), besides the metric's own.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service"})


# --- YAML and env files -------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def yaml_doc(path: Path) -> dict[str, Any]:
    docs = yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's configMapGenerator `envs` reads them."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value
    return values


def setting_env_names() -> set[str]:
    return set(Settings.env_names().values())


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """The Settings a process with exactly these DIGIT_* variables would build (validation included)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("DIGIT_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return Settings()


def digit_env(env: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in env.items() if key.startswith("DIGIT_")}


# --- Dockerfile ---------------------------------------------------------------------------------


@cache
def dockerfile_stages() -> dict[str, list[dockerfile.Command]]:
    """Instructions by stage name, parsed with BuildKit's own parser (the `dockerfile` package)."""
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] | None = None
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            words = list(command.value)
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage is named: FROM {' '.join(words)}"
            current = stages.setdefault(words[2], [])
        if current is not None:
            current.append(command)
    return stages


def final_stage() -> list[dockerfile.Command]:
    return list(dockerfile_stages().values())[-1]


def instructions(stage: list[dockerfile.Command], cmd: str) -> list[dockerfile.Command]:
    return [command for command in stage if command.cmd == cmd]


def image_env() -> dict[str, str]:
    """ENV of the final stage (the key-value form: ENV A=1 B=2)."""
    env: dict[str, str] = {}
    for command in instructions(final_stage(), "ENV"):
        words = list(command.value)
        env.update(zip(words[::2], words[1::2], strict=True))
    return env


def healthcheck_command() -> list[str]:
    (healthcheck,) = instructions(final_stage(), "HEALTHCHECK")
    assert healthcheck.json and healthcheck.value[0] == "CMD", "HEALTHCHECK CMD in exec (JSON) form"
    return list(healthcheck.value[1:])


# --- compose ------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml_doc(COMPOSE)


@cache
def compose_gpu() -> dict[str, Any]:
    return yaml_doc(COMPOSE_GPU)


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def volume_targets(service: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """source -> (target, read-only) of a compose service's volumes, short or long syntax."""
    mounts: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts[source] = (target, "ro" in mode)
        else:
            mounts[volume["source"]] = (volume["target"], bool(volume.get("read_only", False)))
    return mounts


# --- Kubernetes ---------------------------------------------------------------------------------


def kustomization_files() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def patch_files() -> list[Path]:
    """Files that kustomizations use as patches (partial objects)."""
    patches: list[Path] = []
    for kustomization in kustomization_files():
        for patch in yaml_doc(kustomization).get("patches", []):
            if "path" in patch:
                patches.append((kustomization.parent / patch["path"]).resolve())
    return sorted(patches)


def manifest_files() -> list[Path]:
    """Every Kubernetes object file under k8s/: resources, patches and documented variants."""
    return sorted(path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml")


def base_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object of the base's resources, as written (before kustomize)."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in yaml_doc(K8S_BASE / "kustomization.yaml")["resources"]:
        for doc in yaml_docs(K8S_BASE / resource):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def base_config() -> dict[str, str]:
    """The service settings of the base ConfigMap (its configMapGenerator env file)."""
    (generator,) = yaml_doc(K8S_BASE / "kustomization.yaml")["configMapGenerator"]
    values: dict[str, str] = {}
    for env in generator["envs"]:
        values.update(env_file(K8S_BASE / env))
    return values


def pod_containers(pod_spec: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def container(pod_spec: Mapping[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


def mount_path(container_spec: Mapping[str, Any], volume: str) -> str:
    (found,) = [m["mountPath"] for m in container_spec["volumeMounts"] if m["name"] == volume]
    return found


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: the kustomizations are checked file by file only")
    return path


@cache
def _render(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` output: what `kubectl apply -k` would send to the cluster."""
    return list(_render(directory))


def variant_dirs() -> list[Path]:
    """The directories `kubectl apply -k` is pointed at: every Kustomization except the shared base."""
    return [
        path.parent
        for path in kustomization_files()
        if yaml_doc(path)["kind"] == "Kustomization" and path.parent != K8S_BASE
    ]


def component_dirs() -> list[Path]:
    return [path.parent for path in kustomization_files() if yaml_doc(path)["kind"] == "Component"]


def kustomization_with(directory: Path, components: list[str], image: str | None = "digit-service:0.1.0-cpu") -> Path:
    """A user's kustomization in `directory`: the base, the named components of k8s/components, and an image."""
    spec: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_BASE, directory)],  # kustomize takes relative paths only
        "components": [os.path.relpath(K8S / "components" / name, directory) for name in components],
    }
    if image is not None:
        name, tag = image.rsplit(":", 1)
        spec["images"] = [{"name": "digit-service", "newName": name, "newTag": tag}]
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return directory


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _schema_file(kind: str, api_version: str, name: str | None = None) -> Any:
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # apps/v1 -> apps-v1, the package's file names
    root = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{KUBERNETES_VERSION}-local-strict"
    )
    return json.loads((root / (name or f"{kind.lower()}-{api}.json")).read_text(encoding="utf-8"))


def partial_schema_errors(obj: Mapping[str, Any]) -> list[str]:
    """Schema errors of a patch: unknown fields and wrong types count; missing required fields do not
    (a strategic-merge patch carries only what it changes)."""
    schema = _schema_file(obj["kind"], obj["apiVersion"])
    definitions = _schema_file(obj["kind"], obj["apiVersion"], "_definitions.json")
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(obj)
        if error.validator != "required"
    ]


# --- PromQL -------------------------------------------------------------------------------------

_METRIC = re.compile(r"\b(digit_[A-Za-z0-9_:]*)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names(query: str) -> set[str]:
    """The service's metric names (digit_*) a PromQL query reads."""
    return set(_METRIC.findall(query))


def label_names(query: str) -> set[str]:
    """Labels a PromQL query groups by or matches on."""
    labels: set[str] = set()
    for group in _GROUPING.findall(query):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    for selector in _SELECTOR.findall(query):
        labels.update(_MATCHER_LABEL.findall(selector))
    return labels


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_queries() -> list[str]:
    rules = yaml_doc(PROMETHEUS_DIR / "alerts.yml")
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load(yaml_doc(ADAPTER_RULES)["data"]["config.yaml"])["rules"]


def python_command(command: list[str]) -> list[str]:
    """A container's `python ...` command line, run by this interpreter instead."""
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]
