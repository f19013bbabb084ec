"""Hostile input against a real server: each gets a clear 4xx in bounded time, and the server keeps serving."""

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from PIL import Image

from tests.service.live import running_service

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_service({"DIGIT_BODY_TIMEOUT_S": "1", "DIGIT_LOG_LEVEL": "warning"}) as service:
        yield service.base_url


def still_serving(base: str) -> None:
    assert httpx2.post(f"{base}/v1/predict", json={"pixels": [0.0] * 784}, timeout=5).status_code == 200


def timed_post(base: str, path: str, **kwargs: object) -> tuple[httpx2.Response, float]:
    started = time.monotonic()
    response = httpx2.post(f"{base}{path}", timeout=10, **kwargs)
    return response, time.monotonic() - started


def test_deeply_nested_json(server: str) -> None:
    body = b'{"pixels": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response, seconds = timed_post(server, "/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422)
    assert seconds < 2
    still_serving(server)


def test_gigantic_numbers(server: str) -> None:
    huge = b"9" * 100_000
    body = b'{"pixels": [' + huge + b", 0" * 783 + b"]}"
    response, seconds = timed_post(server, "/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422)  # the JSON parser or validation, depending on the size
    assert seconds < 2
    still_serving(server)


def test_animated_image_with_many_frames_decodes_only_the_first(server: str) -> None:
    frames = [Image.new("L", (400, 400), 255 if i else 0) for i in range(300)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    response, seconds = timed_post(
        server, "/v1/predict/image", content=buffer.getvalue(), headers={"Content-Type": "image/gif"}
    )
    assert response.status_code == 200
    assert response.json()["digit"] is None  # the first frame is blank
    assert seconds < 2
    still_serving(server)


def test_decompression_bomb(server: str) -> None:
    buffer = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buffer, format="PNG")  # 900 megapixels in ~100 kB
    response, seconds = timed_post(
        server, "/v1/predict/image", content=buffer.getvalue(), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 413
    assert seconds < 2
    still_serving(server)


def test_huge_declared_body_is_refused_before_it_is_sent(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
        )
        reply = read_response(sock)
    assert reply.startswith(b"HTTP/1.1 413")
    still_serving(server)


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP response: a single recv may return the headers without the body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_slow_client_gets_408_and_does_not_hold_the_server(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
        )
        started = time.monotonic()
        still_serving(server)  # others are served while it dawdles
        reply = read_response(sock)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within 1 s" in reply
    assert waited < 5


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "image/svg+xml", "multipart/form-data; boundary=x"]
)
def test_wrong_content_types(server: str, content_type: str) -> None:
    response, _ = timed_post(server, "/v1/predict/image", content=b"<svg/>", headers={"Content-Type": content_type})
    assert 400 <= response.status_code < 500
    assert response.json()["message"]
    still_serving(server)
