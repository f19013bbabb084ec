"""A compose project of the repository's own docker-compose.yml, under a name of this run's own. Only what this
machine needs is overridden: the base image and torch index (build arguments the file offers to every user), the
build's network (the index is on the host's loopback) and the published port."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tests.container.engine import REPO, RUN_ID, docker, inspect, run

UP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Project:
    name: str
    files: tuple[Path, ...]
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        files = [arg for path in self.files for arg in ("--file", str(path))]
        command = ["docker", "compose", "--project-name", self.name, *files, *args]
        return run(command, timeout=timeout, check=check, env=self.env).stdout

    def container(self, service: str) -> dict[str, Any]:
        ids = self.compose("ps", "--all", "--quiet", service).split()
        assert len(ids) == 1, f"{service}: expected one container, found {ids}"
        return inspect("container", ids[0])

    def published_url(self) -> str:
        address = self.compose("port", "api", "8000").strip()
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1", f"the api is published beyond loopback: {address}"
        return f"http://127.0.0.1:{port}"

    def resources(self) -> dict[str, list[str]]:
        """What of this project is left in the engine: containers, volumes, networks."""
        label = f"label=com.docker.compose.project={self.name}"
        return {
            "containers": docker("ps", "--all", "--quiet", "--filter", label).stdout.split(),
            "volumes": docker("volume", "ls", "--quiet", "--filter", label).stdout.split(),
            "networks": docker("network", "ls", "--quiet", "--filter", label).stdout.split(),
        }


def project(base_image: str, index_url: str, api_port: int, scratch: Path) -> Project:
    override = scratch / "docker-compose.test.yml"
    override.write_text(yaml.safe_dump({"services": {"api": {"build": {"network": "host"}}}}), encoding="utf-8")
    env = {
        "IMAGE": f"digit-service-test:{RUN_ID}-compose",
        "PYTHON_IMAGE": base_image,
        "TORCH_INDEX_URL": index_url,
        "API_PORT": str(api_port),
        "PUBLISH_ADDRESS": "127.0.0.1",
        "DOCKER_BUILDKIT": "1",
    }
    return Project(f"digit-test-{RUN_ID}", (REPO / "docker-compose.yml", override), env)


def up(project: Project) -> float:
    """`docker compose up --build --detach`, then wait until the api is healthy; the seconds it all took."""
    started = time.monotonic()
    project.compose("up", "--build", "--detach", timeout=UP_TIMEOUT_S)
    while time.monotonic() - started < UP_TIMEOUT_S:
        api = project.container("api")
        state = api["State"]
        if state.get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - started
        if state["Status"] in {"exited", "dead"} or api["RestartCount"] > 0:
            raise AssertionError(f"api is {state['Status']}:\n{project.compose('logs', '--tail', '40', check=False)}")
        time.sleep(1.0)
    raise AssertionError(f"api not healthy within {UP_TIMEOUT_S:.0f} s:\n{project.compose('logs', check=False)}")


def timestamp(value: str) -> datetime:
    """The engine's RFC 3339 times carry nanoseconds; datetime keeps microseconds."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", value)
    assert match, value
    seconds, fraction, zone = match.groups()
    fraction = ((fraction or "") + "000000")[:6]
    return datetime.fromisoformat(f"{seconds}.{fraction}{'+00:00' if zone == 'Z' else zone}")


def config(project: Project) -> dict[str, Any]:
    """The project as compose itself resolves it (interpolation, merge of the files, anchors)."""
    return json.loads(project.compose("config", "--format", "json"))
