"""The containers' own commands, run as local processes with the environment the manifests give them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.files import ARTIFACTS, REPO, digit_env, image_env, python_command

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def post_json(url: str, payload: object, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def process_env(manifest_env: Mapping[str, str], port: int) -> dict[str, str]:
    """This machine's environment without DIGIT_*, then the image's and the manifest's settings, then the three
    that must differ on a test machine: loopback, a free port and the repository's artifacts."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DIGIT_")}
    env.update(digit_env(image_env()))
    env.update(digit_env(manifest_env))
    env.update(DIGIT_HOST="127.0.0.1", DIGIT_PORT=str(port), DIGIT_ARTIFACT_DIR=str(ARTIFACTS))
    return env


@dataclass
class ServiceProcess:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


def start(name: str, command: list[str], manifest_env: Mapping[str, str], log: Path) -> ServiceProcess:
    port = free_port()
    env = process_env(manifest_env, port)
    with log.open("wb") as sink:
        process = subprocess.Popen(python_command(command), cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    service = ServiceProcess(name, command, env, port, process, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{name}: `{' '.join(command)}` exited with {process.returncode}:\n{service.output()}")
        try:
            status, _ = get(f"{service.url}/readyz", timeout=1.0)
        except OSError:
            status = 0
        if status == 200:
            return service
        time.sleep(0.2)
    stop(service)
    pytest.fail(f"{name}: /readyz did not answer 200 within {START_TIMEOUT_S:.0f} s:\n{service.output()}")


def stop(service: ServiceProcess) -> None:
    """SIGTERM, as Docker and the kubelet send it, then wait; SIGKILL only past the grace period."""
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


def stopped_cleanly(service: ServiceProcess) -> bool:
    """Shut down through the lifespan within the grace period. uvicorn re-raises the SIGTERM it handled once it
    is done, so the status is 0 or -SIGTERM (143 in a container); -SIGKILL means the drain overran."""
    return service.process.returncode in {0, -signal.SIGTERM} and "Application shutdown complete" in service.output()
