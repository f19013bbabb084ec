"""The Docker engine for the container tests: set up by scripts/container-setup, driven through the docker CLI.
Every name this run creates carries the run's id, so runs never meet and clean-up removes only their own."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "container-setup"
SETUP_TIMEOUT_S = 600.0
RUN_ID = uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Engine:
    base_image: str  # the stand-in for python:3.11-slim-bookworm
    wheels: Path  # torch at the pyproject pin and its dependencies
    build_client: str  # a docker client that builds with BuildKit


def setup() -> Engine:
    """Run scripts/container-setup (installs and starts what is missing); fail, never skip, when it cannot."""
    try:
        result = subprocess.run(
            [str(SETUP)], cwd=REPO, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/container-setup did not finish within {SETUP_TIMEOUT_S:.0f} s: {exc.stderr!r}")
    if result.returncode != 0:
        pytest.fail(f"the container tests need a Docker engine; scripts/container-setup failed:\n{result.stderr}")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return Engine(values["BASE_IMAGE"], Path(values["WHEELS"]), values["BUILD_CLIENT"])


def docker(
    *args: str, timeout: float = 120.0, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout, check=check, env=env)


def run(
    command: Sequence[str], timeout: float = 120.0, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        list(command), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False, env=full_env
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"`{' '.join(command)}` exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def inspect(kind: str, name: str) -> dict[str, Any]:
    (found,) = json.loads(docker(kind, "inspect", name).stdout)
    return found


@dataclass(frozen=True)
class Build:
    tag: str
    seconds: float
    size_bytes: int


def build(engine: Engine, tag: str, index_url: str, build_args: Mapping[str, str] | None = None) -> Build:
    """`docker build` of the repository with the stand-in base and the local torch index. The build runs on the
    host's network, so that it reaches the index on 127.0.0.1."""
    args = {"PYTHON_IMAGE": engine.base_image, "TORCH_INDEX_URL": index_url, **(build_args or {})}
    command = [engine.build_client, "build", "--network", "host", "--tag", tag]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    run([*command, "."], timeout=900, env={"DOCKER_BUILDKIT": "1"})
    seconds = time.monotonic() - started
    return Build(tag, seconds, int(inspect("image", tag)["Size"]))


def remove_image(tag: str) -> None:
    docker("image", "rm", "--force", tag, check=False)


def scratch_dir(parent: Path, name: str) -> Path:
    """A host directory that the image's user (10001) can write: bind mounts keep the host's owner and modes."""
    directory = parent / name
    directory.mkdir()
    directory.chmod(0o777)
    return directory
