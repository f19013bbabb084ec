"""The shared path: what counts as "on the way" to the batcher, and where decoding runs."""

import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.codecs import v1
from tests.service.conftest import build_client
from tests.service.images import draw_seven, png
from tests.service.live import running_service


def test_a_slow_upload_does_not_make_other_requests_wait_for_company() -> None:
    """The batcher waits for requests that are about to reach it, not for a client still trickling
    its body in: with one such upload open, a lone request runs without waiting out the batch wait."""
    env = {"DIGIT_MAX_BATCH_WAIT_MS": "1000", "DIGIT_LOG_LEVEL": "warning"}
    with running_service(env) as service, socket.create_connection(("127.0.0.1", service.port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            b'{"pixels": [0.1,'
        )  # ...and the rest never comes during the test
        time.sleep(0.2)  # the server has received the headers: the request is in flight
        import httpx2

        response = httpx2.post(f"{service.base_url}/v1/predict", json={"pixels": [0.5] * 784}, timeout=10)
        assert response.status_code == 200
        timing = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
        assert float(timing["queue"]) < 500  # waiting for the upload would have taken the whole 1000 ms


def _recording_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    threads: list[str] = []
    real = v1.prepare_image

    def recording(image: Image.Image, preprocess: bool):
        threads.append(threading.current_thread().name)
        return real(image, preprocess)

    monkeypatch.setattr(v1, "prepare_image", recording)
    return threads


def test_big_uploads_are_decoded_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _recording_threads(monkeypatch)
    files = [("file", (f"{i}.png", png(draw_seven(size=512)), "image/png")) for i in range(4)]
    response = client.post("/v1/predict/image", files=files)
    assert response.status_code == 200
    assert [p["digit"] for p in response.json()["predictions"]] != []
    assert len(threads) == 4
    assert all(name.startswith("decode") for name in threads), threads  # the event loop stayed free


def test_a_tiny_upload_is_decoded_inline(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = _recording_threads(monkeypatch)
    tiny = png(Image.fromarray(np.zeros((28, 28), dtype=np.uint8)))
    response = client.post("/v1/predict/image", content=tiny, headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    assert len(threads) == 1 and not threads[0].startswith("decode")  # a thread hop would cost more


def test_requests_being_decoded_count_as_on_the_way_and_leave_the_count_when_done() -> None:
    with build_client() as client:
        pipeline = client.app.state.pipeline
        assert pipeline.on_the_way == 0
        assert client.post("/v1/predict", json={"pixels": [0.5] * 784}).status_code == 200
        assert client.post("/v1/predict", content=b"{bad").status_code == 400  # a decoding error
        assert client.post("/v1/predict", json={"pixels": [0.0] * 784}).status_code == 200  # no digit: no batch
        assert pipeline.on_the_way == 0
