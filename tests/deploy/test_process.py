"""The containers' commands, run here as processes: the service with the manifests' environment becomes ready
and passes the image's healthcheck; the seed step and the trainer job (--skip-existing) prepare a volume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from model_artifact import find_valid_version, list_versions
from tests.deploy.files import (
    ARTIFACTS,
    SEED_SCRIPT,
    base_config,
    base_objects,
    compose,
    container,
    healthcheck_command,
    python_command,
)
from tests.deploy.processes import ServiceProcess, free_port, get, start, stop, stopped_cleanly

MODEL_NAME = base_config()["DIGIT_MODEL_NAME"]


def test_service_command_becomes_ready_with_the_manifest_settings(container_api: ServiceProcess) -> None:
    status, body = get(f"{container_api.url}/readyz")
    assert status == 200
    readiness = json.loads(body)
    assert readiness["status"] == "ready"
    assert readiness["model"]["name"] == container_api.env["DIGIT_MODEL_NAME"] == MODEL_NAME
    assert get(f"{container_api.url}/healthz")[0] == 200


def test_image_and_compose_healthchecks_pass_against_the_running_service(container_api: ServiceProcess) -> None:
    env = {**os.environ, "DIGIT_PORT": str(container_api.port)}
    compose_test = compose()["services"]["api"]["healthcheck"]["test"][1:]
    for command in (healthcheck_command(), compose_test):
        result = subprocess.run(python_command(command), env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_nothing_is_ready() -> None:
    env = {**os.environ, "DIGIT_PORT": str(free_port())}
    result = subprocess.run(python_command(healthcheck_command()), env=env, capture_output=True, timeout=30)
    assert result.returncode != 0


def test_service_stops_cleanly_on_sigterm_within_the_grace_period(tmp_path: Path) -> None:
    api = container(base_objects()[("Deployment", "digit-api")]["spec"]["template"]["spec"], "api")
    service = start("kubernetes api", api["command"], base_config(), tmp_path / "output.log")
    stop(service)
    assert stopped_cleanly(service), service.output()


def test_api_init_container_finds_the_model(kubernetes_api: ServiceProcess) -> None:
    pod = base_objects()[("Deployment", "digit-api")]["spec"]["template"]["spec"]
    (wait,) = pod["initContainers"]
    result = subprocess.run(
        python_command(wait["command"]), env=kubernetes_api.env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert str(ARTIFACTS / MODEL_NAME) in result.stdout


def _seed(source: Path, target: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SEED_SCRIPT), str(source), str(target)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_seed_then_trainer_job_leaves_a_valid_artifact_without_training(tmp_path: Path) -> None:
    volume = tmp_path / "artifacts"
    volume.mkdir()
    _seed(ARTIFACTS, volume)
    seeded = find_valid_version(volume, MODEL_NAME)
    assert seeded is not None, "the seeded copy verifies (metadata + checksum)"
    assert list_versions(volume, MODEL_NAME) == list_versions(ARTIFACTS, MODEL_NAME)
    assert not [p for p in (volume / MODEL_NAME).iterdir() if p.name.startswith(".")], "no half-copied version left"

    pod = base_objects()[("Job", "digit-trainer")]["spec"]["template"]["spec"]
    command = container(pod, "trainer")["command"]
    output_dir = command.index("--output-dir") + 1
    command = [*command[:output_dir], str(volume), *command[output_dir + 1 :]]
    result = subprocess.run(python_command(command), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(seeded), "--skip-existing found the seeded artifact and trained nothing"
    assert list_versions(volume, MODEL_NAME) == list_versions(ARTIFACTS, MODEL_NAME)


def test_seed_never_touches_a_model_that_has_versions(tmp_path: Path) -> None:
    volume = tmp_path / "artifacts"
    trained = volume / MODEL_NAME / "7"
    trained.mkdir(parents=True)
    result = _seed(ARTIFACTS, volume)
    assert "leaving it alone" in result.stdout
    assert list_versions(volume, MODEL_NAME) == [7]


def test_seeding_can_be_turned_off(tmp_path: Path) -> None:
    volume = tmp_path / "artifacts"
    volume.mkdir()
    _seed(ARTIFACTS, volume, SEED_DEFAULT_MODEL="0")
    assert list_versions(volume, MODEL_NAME) == []


def test_seed_script_is_valid_posix_shell() -> None:
    result = subprocess.run(["sh", "-n", str(SEED_SCRIPT)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
