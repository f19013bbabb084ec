"""`docker run` of the CPU image as users run it hardened: read-only root, user 10001, no capabilities; healthy,
answering, and draining in-flight requests on `docker stop`."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest

from service.config import Settings
from tests.container.client import assert_recognises_digits, published_url, sanity_digits, wait_healthy
from tests.container.engine import RUN_ID, docker, inspect
from tests.container.measurements import report
from tests.deploy.processes import get

pytestmark = pytest.mark.container

STOP_GRACE_S = 30  # compose's stop_grace_period for the api
# "A little load": requests caught in flight at the stop, each with 64 images (within the queue limit together).
IMAGES_PER_REQUEST = 64
IN_FLIGHT_REQUESTS = 8
SHUTDOWN_SEEN_S = 30.0


@pytest.fixture(scope="module")
def container(cpu_image: str) -> Iterator[str]:
    name = f"digit-test-{RUN_ID}-run"
    docker(
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--user",
        "10001:10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--publish",
        "127.0.0.1::8000",
        cpu_image,
    )
    try:
        report("docker run: healthy after", f"{wait_healthy(name):.1f} s")
        yield name
    finally:
        docker("rm", "--force", "--volumes", name, check=False)


def test_runs_healthy_as_10001_on_a_read_only_root(container: str) -> None:
    host_config = inspect("container", container)["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True and host_config["CapDrop"] == ["ALL"]
    assert docker("exec", container, "id", "-u").stdout.strip() == "10001"
    denied = docker("exec", container, "touch", "/app/written", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_answers_predictions_on_the_published_port(container: str) -> None:
    url = published_url(container)
    status, body = get(f"{url}/readyz")
    assert status == 200, body
    assert_recognises_digits(url)


def _in_flight(url: str) -> float:
    _, body = get(f"{url}/metrics")
    match = re.search(rb"^digit_http_requests_in_flight(?:\{[^}]*\})? (\S+)$", body, re.M)
    assert match, "the in-flight gauge is in the scrape"
    return float(match.group(1))  # the scrape itself is not measured


def _start_request(url: str, body: bytes) -> http.client.HTTPConnection:
    """A prediction request whose headers and first half of the body are sent: in flight, not yet complete."""
    host_port = urlsplit(url).netloc
    connection = http.client.HTTPConnection(host_port, timeout=60)
    connection.putrequest("POST", "/v1/predict")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    connection.send(body[: len(body) // 2])
    return connection


def _finish_request(connection: http.client.HTTPConnection, body: bytes, expected: list[int]) -> str:
    """Send the rest of the body and read the answer: "ok" (200, the right digits), "refused" (503 with
    Retry-After, the service's answer to work that arrives while it shuts down), or what went wrong."""
    try:
        connection.send(body[len(body) // 2 :])
        response = connection.getresponse()
        answer = response.read()
    except OSError as exc:
        return f"dropped: {exc!r}"
    finally:
        connection.close()
    if response.status == 503 and response.getheader("Retry-After") and b"shutting down" in answer:
        return "refused"
    if response.status != 200:
        return f"answered {response.status}: {answer[:200]!r}"
    digits = [p["digit"] for p in json.loads(answer)["predictions"]]
    return "ok" if digits == expected else f"wrong digits: {digits}"


def test_docker_stop_drains_in_flight_requests_and_exits_cleanly(container: str) -> None:
    """Runs last in this module: it stops the container. Requests are caught in flight deterministically: their
    bodies are half sent when SIGTERM arrives, and finished only once the service has begun shutting down. Each
    must get a whole HTTP answer (none reset or cut off), and the container must exit within the grace period."""
    url = published_url(container)
    images, labels = sanity_digits()
    expected = np.resize(labels, IMAGES_PER_REQUEST).tolist()
    assert Settings.model_fields["queue_limit"].default >= IMAGES_PER_REQUEST * IN_FLIGHT_REQUESTS
    instances = np.resize(images, (IMAGES_PER_REQUEST, 28, 28)).tolist()
    body = json.dumps({"instances": instances}).encode()
    connections = [_start_request(url, body) for _ in range(IN_FLIGHT_REQUESTS)]
    deadline = time.monotonic() + 30
    while (held := _in_flight(url)) < IN_FLIGHT_REQUESTS:
        assert time.monotonic() < deadline, f"only {held:.0f} of {IN_FLIGHT_REQUESTS} requests reached the service"
        time.sleep(0.1)

    stop = threading.Thread(
        target=docker, args=("stop", "--time", str(STOP_GRACE_S), container), kwargs={"timeout": STOP_GRACE_S + 30}
    )
    stop.start()
    deadline = time.monotonic() + SHUTDOWN_SEEN_S
    while "Shutting down" not in _logs(container):
        assert time.monotonic() < deadline, f"no shutdown within {SHUTDOWN_SEEN_S:.0f} s of docker stop"
        time.sleep(0.1)
    outcomes = [_finish_request(connection, body, expected) for connection in connections]
    stop.join(timeout=STOP_GRACE_S + 30)

    dropped = [outcome for outcome in outcomes if outcome not in {"ok", "refused"}]
    report(
        "docker stop with requests in flight (bodies half sent)",
        f"{outcomes.count('ok')} answered 200, {outcomes.count('refused')} answered 503 shutting down, "
        f"{len(dropped)} dropped",
    )
    assert not dropped, dropped
    state = inspect("container", container)["State"]
    assert not state["Running"]
    assert state["ExitCode"] in {0, 143}, f"exit code {state['ExitCode']} (137: killed after the grace period)"
    assert "Application shutdown complete" in _logs(container)


def _logs(container: str) -> str:
    result = docker("logs", container, check=False)
    return result.stdout + result.stderr
