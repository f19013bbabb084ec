"""docker-compose.yml (+ the GPU override): valid against the Compose specification, ordered as
seed -> trainer -> api, and in agreement with the image and the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.config import Settings
from tests.deploy.files import (
    COMPOSE,
    COMPOSE_GPU,
    DOCKERFILE,
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    REPO,
    compose,
    compose_env,
    compose_gpu,
    healthcheck_command,
    image_env,
    setting_env_names,
    settings_from_env,
    volume_targets,
    yaml_doc,
)
from trainer.__main__ import build_parser

ARTIFACTS_TARGET = "/var/lib/digit/artifacts"


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    # check-jsonschema bundles the Compose specification's JSON schema (vendor.compose-spec).
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    result = check_compose_schema(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_mistakes(tmp_path: Path) -> None:
    broken = compose() | {"services": {"api": {"image": "x", "depends_on": {"trainer": {"condition": "done"}}}}}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    result = check_compose_schema(path)
    assert result.returncode == 1, result.stdout + result.stderr


def test_services_run_in_order_seed_then_trainer_then_api() -> None:
    services = compose()["services"]
    assert services["trainer"]["depends_on"] == {"model-seed": {"condition": "service_completed_successfully"}}
    assert services["api"]["depends_on"] == {"trainer": {"condition": "service_completed_successfully"}}
    for one_shot in ("model-seed", "trainer"):
        assert services[one_shot]["restart"] == "no"
        assert services[one_shot]["healthcheck"] == {"disable": True}, "the image's HEALTHCHECK is for the API"
    assert services["api"]["restart"] in {"always", "unless-stopped", "on-failure"}


def test_the_image_is_built_once_for_all_three() -> None:
    # A `build:` on every service made compose build the same image three times.
    services = compose()["services"]
    images = {services[name]["image"] for name in ("model-seed", "trainer", "api")}
    assert len(images) == 1
    assert [name for name, service in services.items() if "build" in service] == ["api"]
    assert services["api"]["build"]["context"] == "."
    for one_shot in ("model-seed", "trainer"):
        assert services[one_shot]["pull_policy"] == "never", "runs the image the api built, never a pulled one"


def test_the_build_takes_the_base_image_and_torch_index_from_the_environment() -> None:
    args = compose()["services"]["api"]["build"]["args"]
    default_base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.M)
    assert default_base is not None
    assert args["PYTHON_IMAGE"] == f"${{PYTHON_IMAGE:-{default_base.group(1)}}}", "the Dockerfile's default base"
    assert args["TORCH_INDEX_URL"] == "${TORCH_INDEX_URL:-}", "empty: the variant's own index"
    assert args["VARIANT"] == "cpu"


def test_published_ports_are_on_loopback_unless_asked_otherwise() -> None:
    services = compose()["services"]
    for name in ("api", "prometheus", "grafana"):
        (published,) = services[name]["ports"]
        assert published.startswith("${PUBLISH_ADDRESS:-127.0.0.1}:"), name


def test_trainer_command_parses_with_the_trainer_cli_and_writes_the_shared_volume() -> None:
    services = compose()["services"]
    command = services["trainer"]["command"]
    assert command[:3] == ["python", "-m", "trainer"]
    args = build_parser().parse_args(command[3:])
    assert args.command == "train" and args.skip_existing
    assert volume_targets(services["trainer"])["artifacts"] == (str(args.output_dir), False)
    assert volume_targets(services["model-seed"])["artifacts"] == (str(args.output_dir), False)
    assert services["model-seed"]["command"] == ["seed-artifacts", image_env()["DIGIT_ARTIFACT_DIR"], ARTIFACTS_TARGET]
    data_dir = compose_env(services["trainer"])["MNIST_DATA_DIR"]
    assert volume_targets(services["trainer"])["mnist-data"] == (data_dir, False)
    assert {"artifacts", "mnist-data"} <= set(compose()["volumes"])


def test_api_runs_the_service_on_the_published_port_with_real_settings() -> None:
    api = compose()["services"]["api"]
    assert api["command"] == ["python", "-m", "service"]
    env = compose_env(api)
    unknown = {key for key in env if key.startswith("DIGIT_")} - setting_env_names()
    assert not unknown, f"not settings of service/config.py: {sorted(unknown)}"
    settings = settings_from_env({**image_env(), **env})
    assert settings.host == "0.0.0.0"
    (published,) = api["ports"]
    assert published.rsplit(":", 1)[1] == str(settings.port) == str(Settings.model_fields["port"].default)
    assert volume_targets(api)["artifacts"] == (str(settings.artifact_dir), True), "the API only reads artifacts"


def test_api_healthcheck_is_the_images_readiness_check() -> None:
    test = compose()["services"]["api"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == healthcheck_command()
    assert "/readyz" in test[-1]


def test_api_stops_within_its_grace_period() -> None:
    api = compose()["services"]["api"]
    grace_s = int(api["stop_grace_period"].removesuffix("s"))
    timeout_s = settings_from_env({**image_env(), **compose_env(api)}).request_timeout_s
    assert grace_s >= (int(timeout_s) + 5) + timeout_s  # uvicorn's drain, then the batcher's


def test_resource_limits_and_hardening() -> None:
    services = compose()["services"]
    for name in ("api", "trainer", "prometheus", "grafana"):
        limits = services[name]["deploy"]["resources"]["limits"]
        assert {"cpus", "memory"} <= limits.keys(), name
    for name in ("model-seed", "trainer", "api"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"], name
        assert "/tmp" in services[name]["tmpfs"], name


def test_monitoring_profile_mounts_the_repositorys_config() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    prometheus = services["prometheus"]
    (config_dir,) = [v for v in prometheus["volumes"] if v.startswith("./deploy/prometheus:")]
    target = config_dir.split(":")[1]
    assert f"--config.file={target}/prometheus.yml" in prometheus["command"]
    assert (PROMETHEUS_DIR / "prometheus.yml").is_file()

    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml_doc(GRAFANA_DIR / "provisioning" / "dashboards" / "digit-service.yml")["providers"][0]
    dashboards_target = grafana_mounts["./deploy/grafana/dashboards"]
    assert provider["options"]["path"] == dashboards_target
    datasource = yaml_doc(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


def test_prometheus_scrapes_the_api_service() -> None:
    config = yaml_doc(PROMETHEUS_DIR / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"api:{Settings.model_fields['port'].default}"]


def test_profiled_services_require_no_variables_at_parse_time() -> None:
    # Compose interpolates every service before it applies profiles: a ${VAR:?} in the monitoring services
    # would stop a plain `docker compose up`. Their required values are checked when they start instead.
    for name, service in compose()["services"].items():
        if "profiles" in service:
            assert not re.search(r"\$\{[^}]*:?\?", yaml.safe_dump(service)), name


def test_grafana_refuses_to_start_without_an_admin_password() -> None:
    grafana = compose()["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    shell, flag, script, name = grafana["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    script = script.replace("$$", "$")  # compose's escape for a literal $
    env = {"GF_SECURITY_ADMIN_PASSWORD": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["sh", "-c", script, name], env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert "GRAFANA_ADMIN_PASSWORD" in result.stderr


def test_gpu_override_reserves_a_gpu_and_selects_cuda() -> None:
    services = compose_gpu()["services"]
    assert set(services) <= set(compose()["services"]), "an override only adds to services of the base file"
    for name in ("trainer", "api"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert services["api"]["build"]["args"]["VARIANT"] == "cuda"
    assert [name for name, service in services.items() if "build" in service] == ["api"], "built once"
    for name in ("model-seed", "trainer"):
        assert services[name]["image"] == services["api"]["image"]
    env = compose_env(services["api"])
    assert set(env) <= setting_env_names()
    assert settings_from_env({**image_env(), **compose_env(compose()["services"]["api"]), **env}).device == "cuda"
    args = build_parser().parse_args(services["trainer"]["command"][3:])
    assert args.device == "cuda" and args.skip_existing


def test_compose_files_use_no_machine_paths() -> None:
    for path in (COMPOSE, COMPOSE_GPU):
        for source in re.findall(r"^\s*-\s*(\S+):/", path.read_text(encoding="utf-8"), re.M):
            assert not source.startswith("/"), f"{path.name}: host path {source}"
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{path.name}: {source} is not in the repository"
