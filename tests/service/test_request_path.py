"""A request resolves its model once: whatever a hot reload installs meanwhile, one answer's body,
headers and logits all come from the version that computed it."""

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.config import Settings
from service.predictor import Predictor
from tests.helpers import Gate, MarkedNet, MeanIntensityNet, make_metadata, probe_image, version_of
from tests.service.images import png


def marked(version: int, temperature: float, gate: bool = False) -> tuple[Predictor, Gate | None]:
    net: torch.nn.Module = MarkedNet(MeanIntensityNet(), version)
    gated = Gate(net) if gate else None
    metadata = make_metadata(version=version, temperature=temperature)
    return Predictor(gated or net, metadata), gated


@pytest.fixture
def serving_v1() -> Iterator[tuple[TestClient, Gate]]:
    old, gate = marked(1, temperature=1.0, gate=True)
    assert gate is not None
    gate.opened.set()  # warm-up passes through
    settings = Settings(max_batch_size=4, max_batch_wait_ms=0)
    with TestClient(create_app(settings, predictor=old, metrics_registry=CollectorRegistry())) as client:
        gate.opened.clear()
        gate.entered.clear()  # the warm-up's passes do not count
        yield client, gate
        gate.opened.set()


def probe_pixels() -> dict:
    return {"pixels": probe_image().tolist()}


def probe_png() -> bytes:
    return png(Image.fromarray((probe_image().numpy() * 255).astype(np.uint8)))


REQUESTS = {
    "v1 pixels": lambda c: c.post("/v1/predict", json=probe_pixels()),
    "v1 image": lambda c: c.post(
        "/v1/predict/image?preprocess=false", content=probe_png(), headers={"Content-Type": "image/png"}
    ),
    "v2": lambda c: c.post(
        "/v2/models/mnist-cnn/versions/1/infer",
        json={
            "inputs": [
                {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": probe_image().flatten().tolist()}
            ]
        },
    ),
}


def answered_by(response) -> dict[str, int]:
    """Every place a response names or shows the version that answered it."""
    body = response.json()
    seen = {"header": int(response.headers["X-Model-Version"])}
    if "outputs" in body:
        outputs = {o["name"]: o for o in body["outputs"]}
        seen["body"] = int(body["model_version"])
        seen["digit"] = outputs["digit"]["data"][0]
        seen["logits"] = version_of(outputs["logits"]["data"])
    else:
        seen["body"] = body["model"]["version"]
        seen["digit"] = body["digit"]
    return seen


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_a_reload_during_a_request_does_not_change_who_answers_it(serving_v1, kind: str) -> None:
    client, gate = serving_v1
    answers: list = []
    in_flight = threading.Thread(target=lambda: answers.append(REQUESTS[kind](client)))
    in_flight.start()
    assert gate.entered.wait(10)  # the request is on the worker thread, computed by version 1
    new, _ = marked(2, temperature=3.0)
    client.portal.call(client.app.state.models.install, new)  # what a hot reload does
    gate.opened.set()
    in_flight.join(10)
    (response,) = answers
    assert response.status_code == 200, response.text
    assert set(answered_by(response).values()) == {1}, answered_by(response)  # body, header, digit, logits
    if kind != "v2":
        # Calibrated with version 1's temperature (1.0), not version 2's (3.0).
        logits = MarkedNet(MeanIntensityNet(), 1)(probe_image()[None, None])
        assert response.json()["confidence"] == pytest.approx(float(torch.softmax(logits, 1).max()), rel=1e-5)
    after = REQUESTS[kind](client)
    if kind == "v2":  # a URL naming version 1 is not computed by version 2 either
        assert after.status_code == 404
        assert "serving version 2" in after.json()["error"]
    else:
        assert set(answered_by(after).values()) == {2}
