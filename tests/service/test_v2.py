"""Open Inference Protocol endpoints, through the app (fake model) and a real tritonclient."""

import json
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.helpers import Gate, MeanIntensityNet
from tests.service.conftest import build_client
from tests.service.live import running_service


def infer_body(images: np.ndarray, datatype: str = "FP32", shape: list[int] | None = None, **extra: object) -> dict:
    n = len(images)
    data = (
        images.reshape(-1).tolist() if datatype == "FP32" else (images.reshape(-1) * 255).round().astype(int).tolist()
    )
    return {
        "inputs": [{"name": "input", "shape": shape or [n, 1, 28, 28], "datatype": datatype, "data": data}],
        **extra,
    }


def levels(*values: float) -> np.ndarray:
    return np.stack([np.full((28, 28), v, dtype=np.float32) for v in values])


def outputs(response) -> dict[str, dict]:
    return {o["name"]: o for o in response.json()["outputs"]}


# --- metadata and health -------------------------------------------------------------------


def test_server_metadata_and_health(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] == "digit-service"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


def test_not_ready_is_a_4xx_before_start_up() -> None:
    client = build_client()
    assert client.get("/v2/health/ready").status_code == 400
    assert client.get("/v2/models/mnist-cnn/ready").status_code == 400
    assert client.get("/v2/health/live").status_code == 200


def test_model_metadata_lists_tensor_specs(client: TestClient) -> None:
    for path in ("/v2/models/mnist-cnn", "/v2/models/mnist-cnn/versions/1"):
        meta = client.get(path).json()
        assert meta["name"] == "tiny"
        assert meta["versions"] == ["1"]
        assert meta["platform"] == "pytorch_torchscript"
        assert meta["inputs"] == [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [-1, 1, 28, 28],
                # every form the input is accepted in
                "parameters": {
                    "accepted_datatypes": ["FP32", "UINT8"],
                    "accepted_shapes": [[-1, 1, 28, 28], [-1, 784]],
                    "range": {"FP32": [0.0, 1.0], "UINT8": [0, 255]},
                },
            }
        ]
        assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
            ("logits", "FP32", [-1, 10]),
            ("probabilities", "FP32", [-1, 10]),
            ("digit", "INT64", [-1]),
        ]


def test_unknown_model_or_version_is_404_with_an_error_object(client: TestClient) -> None:
    for path in ("/v2/models/other", "/v2/models/mnist-cnn/versions/7", "/v2/models/other/ready"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert set(response.json()) == {"error"}
    response = client.post("/v2/models/other/infer", json=infer_body(levels(0.3)))
    assert response.status_code == 404
    assert "unknown model 'other'" in response.json()["error"]


def test_model_ready(client: TestClient) -> None:
    assert client.get("/v2/models/mnist-cnn/ready").json() == {"name": "mnist-cnn", "ready": True}
    assert client.get("/v2/models/mnist-cnn/versions/1/ready").status_code == 200


# --- inference ------------------------------------------------------------------------------


def test_infer_fp32_returns_all_outputs_with_the_request_id(client: TestClient) -> None:
    response = client.post("/v2/models/mnist-cnn/infer", json=infer_body(levels(0.2, 0.7), id="req-42"))
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "tiny"
    assert body["model_version"] == "1"
    assert body["id"] == "req-42"
    out = outputs(response)
    assert out["digit"] == {"name": "digit", "datatype": "INT64", "shape": [2], "data": [2, 7]}
    assert out["logits"]["shape"] == [2, 10]
    assert len(out["logits"]["data"]) == 20  # flattened, row-major
    probabilities = np.array(out["probabilities"]["data"]).reshape(2, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert response.headers["X-Model-Version"] == "1"


def test_infer_accepts_flat_784_nested_data_and_uint8(client: TestClient) -> None:
    flat = client.post("/v2/models/mnist-cnn/infer", json=infer_body(levels(0.4), shape=[1, 784]))
    nested_body = infer_body(levels(0.4))
    nested_body["inputs"][0]["data"] = levels(0.4).reshape(1, 1, 28, 28).tolist()
    nested = client.post("/v2/models/mnist-cnn/versions/1/infer", json=nested_body)
    uint8 = client.post("/v2/models/mnist-cnn/infer", json=infer_body(levels(0.4), datatype="UINT8"))
    for response in (flat, nested, uint8):
        assert response.status_code == 200, response.text
        assert outputs(response)["digit"]["data"] == [4]


def test_outputs_selection_is_honoured(client: TestClient) -> None:
    body = infer_body(levels(0.5), outputs=[{"name": "digit"}])
    response = client.post("/v2/models/mnist-cnn/infer", json=body)
    assert [o["name"] for o in response.json()["outputs"]] == ["digit"]
    assert "id" not in response.json()


def _binary_request(images: np.ndarray, outputs_: list[dict] | None = None) -> tuple[bytes, dict[str, str]]:
    raw = images.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [len(images), 1, 28, 28],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": outputs_ or [{"name": "digit", "parameters": {"binary_data": True}}, {"name": "probabilities"}],
    }
    encoded = json.dumps(header).encode()
    return encoded + raw, {
        "Inference-Header-Content-Length": str(len(encoded)),
        "Content-Type": "application/octet-stream",
    }


def test_binary_tensor_data_in_and_out(client: TestClient) -> None:
    body, headers = _binary_request(levels(0.3, 0.9))
    response = client.post("/v2/models/mnist-cnn/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    header_length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.content[:header_length])
    digit, probabilities = header["outputs"]
    assert digit["parameters"] == {"binary_data_size": 16}
    assert "data" not in digit
    assert struct.unpack("<2q", response.content[header_length:]) == (3, 9)
    assert len(probabilities["data"]) == 20  # asked for as JSON


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda b: b["inputs"][0].update(name="image"), "one input named 'input'"),
        (lambda b: b["inputs"].append(dict(b["inputs"][0])), "one input named 'input'"),
        (lambda b: b["inputs"][0].update(datatype="FP64"), "datatype must be FP32"),
        (lambda b: b["inputs"][0].update(shape=[1, 28, 28]), "shape must be [N, 1, 28, 28] or [N, 784]"),
        (lambda b: b["inputs"][0].update(shape=[2, 1, 28, 28]), "needs 1568 values, data has 784"),
        (lambda b: b["inputs"][0]["data"].__setitem__(0, 1.5), "must be in 0..1"),
        (lambda b: b["inputs"][0]["data"].__setitem__(0, "x"), "data must be numbers"),
        (lambda b: b["inputs"][0].pop("data"), "give `data`"),
        (lambda b: b.update(outputs=[{"name": "embedding"}]), "unknown output 'embedding'"),
        (lambda b: b.update(outputs=[{"name": "digit"}, {"name": "digit"}]), "requested twice"),
        (lambda b: b.update(inputs=[]), "inputs"),
        (lambda b: b.update(surprise=1), "surprise"),
    ],
)
def test_bad_inference_requests_are_400_with_an_error_object(client: TestClient, mutate, fragment: str) -> None:
    body = infer_body(levels(0.3))
    mutate(body)
    response = client.post("/v2/models/mnist-cnn/infer", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert fragment in response.json()["error"]


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"", {}, "empty"),
        (b"{not json", {}, "not valid JSON"),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [NaN'
            + b", 0" * 783
            + b"]}]}",
            {},
            "finite",
        ),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "does not fit"),
        (b"{}", {"Inference-Header-Content-Length": "two"}, "must be an integer"),
    ],
)
def test_malformed_bodies_are_400(client: TestClient, content: bytes, headers: dict, fragment: str) -> None:
    response = client.post("/v2/models/mnist-cnn/infer", content=content, headers=headers)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_binary_sizes_are_checked(client: TestClient) -> None:
    body, headers = _binary_request(levels(0.3))
    truncated = client.post("/v2/models/mnist-cnn/infer", content=body[:-10], headers=headers)
    assert truncated.status_code == 400
    assert "truncated" in truncated.json()["error"]
    extra = client.post("/v2/models/mnist-cnn/infer", content=body + b"\x00" * 8, headers=headers)
    assert "not claimed" in extra.json()["error"]
    header = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    header["inputs"][0]["parameters"]["binary_data_size"] = 100
    encoded = json.dumps(header).encode()
    wrong = client.post(
        "/v2/models/mnist-cnn/infer",
        content=encoded + body[int(headers["Inference-Header-Content-Length"]) :],
        headers={"Inference-Header-Content-Length": str(len(encoded))},
    )
    assert "needs 3136 bytes, binary_data_size says 100" in wrong.json()["error"]


def test_too_many_images_is_refused() -> None:
    with build_client(Settings(max_instances=2, max_batch_wait_ms=1)) as client:
        response = client.post("/v2/models/mnist-cnn/infer", json=infer_body(levels(0.1, 0.2, 0.3)))
    assert response.status_code == 400
    assert "3 images is over the limit of 2" in response.json()["error"]


def test_v2_requests_share_batches_and_metrics_with_v1() -> None:
    gate = Gate(MeanIntensityNet())
    gate.opened.set()  # the warm-up passes through
    settings = Settings(max_batch_size=8, max_batch_wait_ms=0, max_queue_delay_ms=60_000)
    with build_client(settings, model=gate) as client:
        gate.opened.clear()
        gate.entered.clear()
        batcher = client.app.state.lifecycle.batcher
        batch_sizes: dict[str, str] = {}

        def call(name: str, path: str, body: dict) -> None:
            batch_sizes[name] = client.post(path, json=body).headers["X-Batch-Size"]

        first = threading.Thread(target=call, args=("first", "/v1/predict", {"pixels": [0.1] * 784}))
        first.start()
        assert gate.entered.wait(10)  # the first request holds the worker
        later = [
            threading.Thread(target=call, args=("v1", "/v1/predict", {"pixels": [0.6] * 784})),
            threading.Thread(target=call, args=("v2", "/v2/models/mnist-cnn/infer", infer_body(levels(0.6)))),
        ]
        for thread in later:
            thread.start()
        deadline = time.monotonic() + 10
        while batcher.queue_depth < 2:  # both later requests are queued behind it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.opened.set()
        for thread in [first, *later]:
            thread.join()
        metrics = client.get("/metrics").text
    assert batch_sizes == {"first": "1", "v1": "2", "v2": "2"}  # one forward pass served both APIs
    assert 'digit_predictions_total{digit="6"} 2.0' in metrics
    assert 'route="/v2/models/{name}/infer"' in metrics
    assert "/v2/health" not in metrics


# --- a real client: NVIDIA's tritonclient against a running server ----------------------------


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    with running_service({"DIGIT_LOG_LEVEL": "warning"}) as service:
        yield service.base_url.removeprefix("http://")


@pytest.mark.dataset
def test_tritonclient_reads_metadata_checks_health_and_recognises_real_digits(live_server: str) -> None:
    import tritonclient.http as triton

    from trainer.data import load_mnist

    client = triton.InferenceServerClient(url=live_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist-cnn")
    assert not client.is_model_ready("mnist-cnn", model_version="999")
    server = client.get_server_metadata()
    assert server["name"] == "digit-service"
    assert "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("mnist-cnn")
    assert {key: model["inputs"][0][key] for key in ("name", "datatype", "shape")} == {
        "name": "input",
        "datatype": "FP32",
        "shape": [-1, 1, 28, 28],
    }

    test = load_mnist().test
    images, labels = test.images[:64], test.labels[:64].astype(np.int64)
    for binary in (True, False):  # the binary tensor extension, and plain JSON
        batch = triton.InferInput("input", [64, 1, 28, 28], "FP32")
        batch.set_data_from_numpy((images.astype(np.float32) / 255).reshape(64, 1, 28, 28), binary_data=binary)
        requested = [
            triton.InferRequestedOutput("digit", binary_data=binary),
            triton.InferRequestedOutput("probabilities", binary_data=binary),
        ]
        result = client.infer("mnist-cnn", [batch], outputs=requested, request_id=f"check-{binary}")
        assert result.get_response()["id"] == f"check-{binary}"
        assert np.array_equal(result.as_numpy("digit"), labels)
        assert result.as_numpy("probabilities").shape == (64, 10)
        assert result.as_numpy("logits") is None  # not requested

    uint8 = triton.InferInput("input", [8, 784], "UINT8")
    uint8.set_data_from_numpy(images[:8].reshape(8, 784))
    served = client.get_model_metadata("mnist-cnn")["versions"][0]
    result = client.infer("mnist-cnn", [uint8], model_version=served)  # no outputs named: all, as binary
    assert np.array_equal(result.as_numpy("digit"), labels[:8])
    assert result.as_numpy("logits").shape == (8, 10)

    with pytest.raises(triton.InferenceServerException, match="datatype must be FP32"):
        wrong = triton.InferInput("input", [1, 784], "FP64")
        wrong.set_data_from_numpy(np.zeros((1, 784)))
        client.infer("mnist-cnn", [wrong])
    client.close()


def test_an_input_with_no_digit_gets_digit_minus_one_like_v1_says_no_digit(client: TestClient) -> None:
    blank = [0] * 784
    stroke = [0] * 784
    for row in range(6, 22):
        stroke[row * 28 + 14] = 128
    body = {"inputs": [{"name": "input", "shape": [2, 784], "datatype": "UINT8", "data": blank + stroke}]}
    response = client.post("/v2/models/mnist-cnn/infer", json=body)
    assert response.status_code == 200
    out = outputs(response)
    assert out["digit"]["data"][0] == -1  # the same rule as /v1's "no digit found"
    assert out["probabilities"]["data"][:10] == [0.0] * 10
    assert out["digit"]["data"][1] != -1
    assert response.headers["X-Batch-Size"] == "1"  # only the real image reached the model
    v1 = client.post("/v1/predict", json={"instances": [[0.0] * 784, [v / 255 for v in stroke]]}).json()
    assert v1["predictions"][0]["digit"] is None
    assert v1["predictions"][1]["digit"] == out["digit"]["data"][1]


def test_a_body_in_a_browser_form_type_is_refused(client: TestClient) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}]}
    response = client.post(
        "/v2/models/mnist-cnn/infer", content=json.dumps(body), headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert set(response.json()) == {"error"}


def test_output_flags_must_be_booleans(client: TestClient) -> None:
    body = infer_body(levels(0.5), outputs=[{"name": "digit", "parameters": {"binary_data": "false"}}])
    response = client.post("/v2/models/mnist-cnn/infer", json=body)
    assert response.status_code == 400  # "false" as a string is not false
    assert "binary_data" in response.json()["error"]
