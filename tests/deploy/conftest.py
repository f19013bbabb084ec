"""Session fixtures: the API container's command, run as a local process with the environment that the
Kubernetes manifests and the compose file give it (image ENV + ConfigMap or compose environment)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.files import base_config, base_objects, compose, compose_env, container
from tests.deploy.processes import ServiceProcess, start, stop


@pytest.fixture(scope="session")
def kubernetes_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The Deployment's api container: its command, the image's ENV and the ConfigMap."""
    api = container(base_objects()[("Deployment", "digit-api")]["spec"]["template"]["spec"], "api")
    log = tmp_path_factory.mktemp("kubernetes-api") / "output.log"
    service = start("kubernetes api", api["command"], base_config(), log)
    yield service
    stop(service)


@pytest.fixture(scope="session")
def compose_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """docker-compose.yml's api service: its command, the image's ENV and its environment."""
    api = compose()["services"]["api"]
    log = tmp_path_factory.mktemp("compose-api") / "output.log"
    service = start("compose api", api["command"], compose_env(api), log)
    yield service
    stop(service)


@pytest.fixture(params=["kubernetes_api", "compose_api"])
def container_api(request: pytest.FixtureRequest) -> ServiceProcess:
    return request.getfixturevalue(request.param)
