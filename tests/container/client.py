"""What the container tests ask a running service, through a port published on 127.0.0.1 only."""

from __future__ import annotations

import json
import time

import numpy as np

from tests.container.engine import REPO, docker, inspect
from tests.deploy.processes import get, post_json

SANITY_DIGITS = REPO / "service" / "sanity_digits.npz"  # 2 MNIST test digits of each class, with their labels
HEALTHY_TIMEOUT_S = 120.0


def published_url(container: str) -> str:
    """The container's port 8000 as published on the host; anything but loopback is refused."""
    (binding,) = inspect("container", container)["NetworkSettings"]["Ports"]["8000/tcp"]
    assert binding["HostIp"] == "127.0.0.1", f"published beyond loopback: {binding}"
    return f"http://127.0.0.1:{binding['HostPort']}"


def wait_healthy(container: str, timeout_s: float = HEALTHY_TIMEOUT_S) -> float:
    """Wait until the engine's healthcheck (the image's HEALTHCHECK on /readyz) says healthy; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        state = inspect("container", container)["State"]
        if not state["Running"]:
            logs = docker("logs", "--tail", "40", container, check=False)
            raise AssertionError(f"{container} exited with {state['ExitCode']}:\n{logs.stdout}{logs.stderr}")
        if state.get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - started
        time.sleep(1.0)
    logs = docker("logs", "--tail", "40", container, check=False)
    raise AssertionError(f"{container} not healthy within {timeout_s:.0f} s:\n{logs.stdout}{logs.stderr}")


def sanity_digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SANITY_DIGITS) as data:
        return data["images"].astype(np.float32) / 255.0, data["labels"].astype(int)


def assert_recognises_digits(base_url: str) -> None:
    """The 20 sanity digits (white on black, 0..1) as one request: every one recognised."""
    images, labels = sanity_digits()
    status, body = post_json(f"{base_url}/v1/predict", {"instances": images.tolist()}, timeout=30)
    assert status == 200, body
    predicted = [p["digit"] for p in json.loads(body)["predictions"]]
    assert predicted == labels.tolist()


def model_version(base_url: str) -> int:
    status, body = get(f"{base_url}/v1/model")
    assert status == 200, body
    return int(json.loads(body)["version"])
