import io
import json
import math
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from tests.helpers import ExplodingNet, Gate, MeanIntensityNet, SlowNet
from tests.service.conftest import build_client
from tests.service.images import draw_seven, encode, png


def flat(value: float) -> list[float]:
    return [value] * 784


def grid(value: float) -> list[list[float]]:
    return [[value] * 28 for _ in range(28)]


# --- POST /v1/predict: success -----------------------------------------------------------


def test_one_image_as_nested_rows(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"pixels": grid(0.3)})
    assert response.status_code == 200
    body = response.json()
    assert body["digit"] == 3
    assert len(body["probabilities"]) == 10
    assert math.isclose(sum(body["probabilities"]), 1.0, abs_tol=1e-5)
    assert body["confidence"] == max(body["probabilities"])
    assert body["model"] == {"name": "tiny", "version": 1}
    assert "input" not in body
    assert "detail" not in body


def test_one_image_as_a_flat_list(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"pixels": flat(0.7)})
    assert response.status_code == 200
    assert response.json()["digit"] == 7


def test_instances_answer_in_order(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"instances": [grid(0.1), flat(0.5), grid(0.9)]})
    assert response.status_code == 200
    body = response.json()
    assert [p["digit"] for p in body["predictions"]] == [1, 5, 9]
    assert body["model"]["version"] == 1


def test_response_headers_say_how_it_was_served(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"pixels": grid(0.2)})
    assert response.headers["X-Model-Version"] == "1"
    assert int(response.headers["X-Batch-Size"]) >= 1
    timing = dict(part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    assert set(timing) == {"queue", "preprocess", "inference"}
    assert all(float(v) >= 0 for v in timing.values())


def test_return_input_gives_the_28x28_the_model_saw(client: TestClient) -> None:
    body = client.post("/v1/predict", json={"pixels": grid(0.4), "return_input": True}).json()
    assert np.array(body["input"]).shape == (28, 28)
    assert body["input"][0][0] == pytest.approx(0.4)


def test_calibration_temperature_softens_probabilities() -> None:
    with build_client(temperature=1.0) as sharp, build_client(temperature=3.0) as soft:
        p_sharp = sharp.post("/v1/predict", json={"pixels": grid(0.33)}).json()["confidence"]
        p_soft = soft.post("/v1/predict", json={"pixels": grid(0.33)}).json()["confidence"]
    assert p_soft < p_sharp


def test_preprocess_accepts_a_canvas_sized_array_of_either_polarity(client: TestClient) -> None:
    canvas = np.asarray(draw_seven(), dtype=np.float32) / 255.0  # dark ink on white, 280x280
    light = client.post("/v1/predict", json={"pixels": canvas.tolist(), "preprocess": True, "return_input": True})
    dark = client.post("/v1/predict", json={"pixels": (1 - canvas).tolist(), "preprocess": True, "return_input": True})
    assert light.status_code == dark.status_code == 200
    seen_light, seen_dark = np.array(light.json()["input"]), np.array(dark.json()["input"])
    assert seen_light.shape == (28, 28)
    assert seen_light[0, 0] == 0.0  # background became black
    assert np.abs(seen_light - seen_dark).max() < 1e-3


def test_blank_pixels_say_no_digit_found_instead_of_guessing(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"instances": [grid(0.0), grid(0.5), flat(0.01)]})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["digit"] for p in predictions] == [None, 5, None]
    assert predictions[0]["detail"] == "no digit found: the image is blank or has too little ink"
    assert predictions[2]["detail"] == predictions[0]["detail"]  # one rule, one message
    assert response.headers["X-Batch-Size"] == "1"  # only the real image reached the model


def test_preprocess_blank_canvas_says_no_digit_found(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"pixels": [[1.0] * 100] * 100, "preprocess": True})
    assert response.status_code == 200
    body = response.json()
    assert body["digit"] is None
    assert body["probabilities"] is None
    assert "no digit found" in body["detail"]


# --- POST /v1/predict: failures ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        (b"", 400, "bad_request", "empty"),
        (b"{not json", 400, "bad_request", "not valid JSON"),
        (b"[1, 2, 3]", 422, "invalid_input", "Input should be an object"),
        (b"{}", 422, "invalid_input", "exactly one of"),
        (json.dumps({"pixels": grid(0.1), "instances": [grid(0.1)]}).encode(), 422, "invalid_input", "exactly one of"),
        (json.dumps({"pixels": grid(0.1)[:27]}).encode(), 422, "invalid_input", "expected 28x28, got 27x28"),
        (json.dumps({"pixels": flat(0.1)[:783]}).encode(), 422, "invalid_input", "expected 784 values"),
        (json.dumps({"pixels": [[0.1] * 28] * 27 + [[0.1] * 27]}).encode(), 422, "invalid_input", "same length"),
        (
            json.dumps({"pixels": [[[0.1]]]}).encode(),
            422,
            "invalid_input",
            "pixels.0: Input should be a valid number",
        ),
        (json.dumps({"pixels": [1.5, *flat(0.1)[1:]]}).encode(), 422, "invalid_input", "less than or equal to 1"),
        (json.dumps({"pixels": [-0.1, *flat(0.1)[1:]]}).encode(), 422, "invalid_input", "greater than or equal to 0"),
        (json.dumps({"pixels": ["0.5", *flat(0.1)[1:]]}).encode(), 422, "invalid_input", "valid number"),
        (json.dumps({"pixels": [True, *flat(0.1)[1:]]}).encode(), 422, "invalid_input", "valid number"),
        (b'{"pixels": [NaN' + b", 0.1" * 783 + b"]}", 422, "invalid_input", "finite number"),
        (b'{"pixels": [Infinity' + b", 0.1" * 783 + b"]}", 422, "invalid_input", "finite number"),
        (b'{"pixels": [1e999' + b", 0.1" * 783 + b"]}", 422, "invalid_input", "pixels.0"),
        (json.dumps({"pixels": grid(0.1), "colour": "red"}).encode(), 422, "invalid_input", "colour"),
        (json.dumps({"instances": []}).encode(), 422, "invalid_input", "instances"),
        (json.dumps({"pixels": None}).encode(), 422, "invalid_input", "exactly one of"),
    ],
)
def test_bad_json_inputs_get_a_4xx_naming_the_problem(
    client: TestClient, body: bytes, status: int, code: str, fragment: str
) -> None:
    response = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] == code
    assert fragment in error["message"]
    # ...and the service keeps serving.
    assert client.post("/v1/predict", json={"pixels": grid(0.5)}).status_code == 200


def test_too_many_instances_is_refused() -> None:
    with build_client(Settings(max_instances=3, max_batch_wait_ms=1)) as client:
        response = client.post("/v1/predict", json={"instances": [grid(0.1)] * 4})
    assert response.status_code == 413
    assert response.json()["message"] == "too many instances: 4 (limit 3)"


def test_oversized_preprocess_array_is_refused() -> None:
    with build_client(Settings(max_preprocess_side=100, max_batch_wait_ms=1)) as client:
        response = client.post("/v1/predict", json={"pixels": [[0.0] * 101] * 101, "preprocess": True})
    assert response.status_code == 413
    assert "101x101" in response.json()["message"]


def test_body_over_the_limit_is_refused_before_reading() -> None:
    with build_client(Settings(max_body_bytes=4096, max_batch_wait_ms=1)) as client:
        response = client.post("/v1/predict", json={"pixels": grid(0.123456)})
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        chunked = client.post("/v1/predict", content=iter([b'{"pixels": [' + b"0.1," * 2000, b"0.1]}"]))
        assert chunked.status_code == 413


def test_model_failure_is_a_500_naming_it_and_the_service_recovers() -> None:
    with build_client(model=ExplodingNet()) as client:
        failed = client.post("/v1/predict", json={"pixels": grid(0.5)})
        assert failed.status_code == 500
        assert failed.json()["error"] == "model_error"
        assert "RuntimeError" in failed.json()["message"]
        assert "Traceback" not in failed.text
        assert client.post("/v1/predict", json={"pixels": grid(0.2)}).json()["digit"] == 2


def gated_client(settings: Settings) -> tuple[TestClient, Gate]:
    """A client on a model that blocks every forward pass until the test opens its gate."""
    gate = Gate(MeanIntensityNet())
    gate.opened.set()  # the warm-up passes through
    client = build_client(settings, model=gate)
    client.__enter__()
    gate.opened.clear()
    gate.entered.clear()
    return client, gate


def test_full_queue_answers_429_with_retry_after() -> None:
    settings = Settings(queue_limit=1, max_instances=1, max_files=1, max_batch_size=1, max_batch_wait_ms=0)
    client, gate = gated_client(settings)
    try:
        statuses: list[int] = []
        running = threading.Thread(
            target=lambda: statuses.append(client.post("/v1/predict", json={"pixels": grid(0.1)}).status_code)
        )
        running.start()
        assert gate.entered.wait(10)  # one request on the worker thread
        queued = threading.Thread(
            target=lambda: statuses.append(client.post("/v1/predict", json={"pixels": grid(0.2)}).status_code)
        )
        queued.start()
        batcher = client.app.state.lifecycle.batcher
        deadline = time.monotonic() + 10
        while batcher.queue_depth < 1:  # and one in the queue: it is full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        rejected = client.post("/v1/predict", json={"pixels": grid(0.3)})
        assert rejected.status_code == 429
        assert "1 images queued (limit 1)" in rejected.json()["message"]
        assert int(rejected.headers["retry-after"]) >= 1
        gate.opened.set()
        running.join(10)
        queued.join(10)
        assert statuses == [200, 200]  # what was admitted is served
    finally:
        gate.opened.set()
        client.__exit__(None, None, None)


def test_request_timeout_answers_504() -> None:
    settings = Settings(request_timeout_s=0.05, max_batch_wait_ms=0)
    with build_client(settings, model=SlowNet(0.3)) as client:
        response = client.post("/v1/predict", json={"pixels": grid(0.1)})
    assert response.status_code == 504
    assert "deadline of 0.05 s" in response.json()["message"]


# --- POST /v1/predict/image -------------------------------------------------------------


def test_png_upload_as_raw_body(client: TestClient) -> None:
    response = client.post(
        "/v1/predict/image?return_input=true", content=png(draw_seven()), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["digit"], int)
    seen = np.array(body["input"])
    assert seen.shape == (28, 28)
    assert seen.max() == pytest.approx(1.0)
    assert seen[0].sum() == 0  # black background, digit inside the field


def test_several_files_in_one_multipart_request(client: TestClient) -> None:
    files = [
        ("file", ("a.png", png(draw_seven()), "image/png")),
        ("file", ("b.png", png(draw_seven(ink=255, paper=0)), "image/png")),
    ]
    response = client.post("/v1/predict/image", files=files)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    assert predictions[0]["digit"] == predictions[1]["digit"]  # polarity does not matter


def test_response_shape_follows_the_request_form_not_the_file_count(client: TestClient) -> None:
    one_file = client.post("/v1/predict/image", files={"file": ("a.png", png(draw_seven()), "image/png")})
    assert one_file.status_code == 200
    assert set(one_file.json()) == {"predictions", "model"}  # multipart: always a list, even of one
    assert len(one_file.json()["predictions"]) == 1
    raw = client.post("/v1/predict/image", content=png(draw_seven()), headers={"Content-Type": "image/png"})
    assert set(raw.json()) == {"digit", "confidence", "probabilities", "model"}  # a raw body: one object
    assert raw.json()["digit"] == one_file.json()["predictions"][0]["digit"]


def test_blank_image_says_no_digit_found(client: TestClient) -> None:
    response = client.post(
        "/v1/predict/image", content=png(Image.new("L", (200, 200), 255)), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    assert response.json()["digit"] is None
    assert "no digit found" in response.json()["detail"]


def _seen(client: TestClient, data: bytes, content_type: str) -> np.ndarray:
    response = client.post("/v1/predict/image?return_input=true", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    return np.array(response.json()["input"])


def test_off_centre_scaled_and_inverted_drawings_look_the_same_to_the_model(client: TestClient) -> None:
    reference = _seen(client, png(draw_seven()), "image/png")
    variants = {
        "off-centre": draw_seven(box=(0.02, 0.05, 0.4, 0.5)),
        "small": draw_seven(box=(0.6, 0.6, 0.8, 0.85), width_frac=0.025),
        "inverted": draw_seven(ink=255, paper=0),
        "grey paper": draw_seven(ink=40, paper=200),
    }
    for name, image in variants.items():
        seen = _seen(client, png(image), "image/png")
        assert np.abs(seen - reference).mean() < 0.08, name
        rows, cols = np.nonzero(seen)
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 == 20, name
        com_y = (seen.sum(axis=1) * np.arange(28)).sum() / seen.sum()
        com_x = (seen.sum(axis=0) * np.arange(28)).sum() / seen.sum()
        assert abs(com_y - 14) <= 0.5 and abs(com_x - 14) <= 0.5, name


def test_transparent_canvas_with_dark_or_light_ink(client: TestClient) -> None:
    reference = _seen(client, png(draw_seven()), "image/png")
    for ink in (0, 255):
        rgba = draw_seven(ink=ink, paper=0, mode="RGBA")
        alpha = np.asarray(draw_seven(ink=255, paper=0))  # opaque where the strokes are
        pixels = np.asarray(rgba).copy()
        pixels[..., 3] = alpha
        seen = _seen(client, png(Image.fromarray(pixels, "RGBA")), "image/png")
        assert np.abs(seen - reference).mean() < 0.05, ink


@pytest.mark.parametrize(
    ("fmt", "content_type", "mode"),
    [
        ("JPEG", "image/jpeg", "RGB"),
        ("WEBP", "image/webp", "RGB"),
        ("BMP", "image/bmp", "L"),
        ("GIF", "image/gif", "P"),
        ("PNG", "image/png", "P"),
    ],
)
def test_common_formats_and_modes(client: TestClient, fmt: str, content_type: str, mode: str) -> None:
    reference = _seen(client, png(draw_seven()), "image/png")
    image = draw_seven().convert(mode)
    seen = _seen(client, encode(image, fmt, **({"quality": 70} if fmt == "JPEG" else {})), content_type)
    assert np.abs(seen - reference).mean() < 0.05


def test_animated_gif_uses_the_first_frame(client: TestClient) -> None:
    frames = [draw_seven().convert("P"), Image.new("P", (280, 280), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    response = client.post("/v1/predict/image", content=buffer.getvalue(), headers={"Content-Type": "image/gif"})
    assert response.status_code == 200
    assert response.json()["digit"] is not None


# --- POST /v1/predict/image: failures ----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code", "fragment"),
    [
        (b"hello", "text/plain", 415, "unsupported_media_type", "content type text/plain"),
        (b"hello", "", 415, "unsupported_media_type", "content type none"),
        (b"not an image at all", "image/png", 415, "unsupported_media_type", "not a recognised image"),
        (b"", "image/png", 422, "invalid_image", "empty"),
        (png(draw_seven())[:300], "image/png", 422, "invalid_image", "truncated"),
        (encode(draw_seven(), "JPEG")[:500], "image/jpeg", 422, "invalid_image", "truncated"),
        (png(Image.new("L", (5000, 4000))), "image/png", 413, "image_too_large", "5000x4000"),
    ],
)
def test_bad_images_get_a_4xx_naming_the_problem(
    client: TestClient, data: bytes, content_type: str, status: int, code: str, fragment: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/predict/image", content=data, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert fragment in response.json()["message"]
    assert (
        client.post("/v1/predict/image", content=png(draw_seven()), headers={"Content-Type": "image/png"}).status_code
        == 200
    )


def test_decompression_bomb_beyond_pillows_own_limit_is_refused(client: TestClient) -> None:
    bomb = png(Image.new("1", (20000, 10000)))  # 200 megapixels in a few kB
    response = client.post("/v1/predict/image", content=bomb, headers={"Content-Type": "image/png"})
    assert response.status_code == 413
    assert response.json()["error"] == "image_too_large"


def test_image_over_the_byte_limit_is_refused() -> None:
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
    with build_client(Settings(max_body_bytes=8192, max_batch_wait_ms=1)) as client:
        response = client.post("/v1/predict/image", content=png(noisy), headers={"Content-Type": "image/png"})
    assert response.status_code == 413


def test_too_many_files_is_refused() -> None:
    with build_client(Settings(max_files=2, max_batch_wait_ms=1)) as client:
        files = [("file", (f"{i}.png", png(draw_seven()), "image/png")) for i in range(3)]
        response = client.post("/v1/predict/image", files=files)
    assert response.status_code == 413
    assert response.json()["message"] == "too many files: the limit is 2 per request"


def test_multipart_without_a_file_field(client: TestClient) -> None:
    response = client.post(
        "/v1/predict/image", data={"other": "x"}, files={"picture": ("a.png", png(draw_seven()), "image/png")}
    )
    assert response.status_code == 422
    assert "`file`" in response.json()["message"]


def test_bad_file_among_several_is_named_by_position(client: TestClient) -> None:
    files = [("file", ("a.png", png(draw_seven()), "image/png")), ("file", ("b.png", b"junk", "image/png"))]
    response = client.post("/v1/predict/image", files=files)
    assert response.status_code == 415
    assert response.json()["message"].startswith("file 2:")


def test_client_deadline_header_is_honoured() -> None:
    client, gate = gated_client(Settings(max_batch_wait_ms=0, request_timeout_s=10))
    try:
        response = client.post("/v1/predict", json={"pixels": grid(0.1)}, headers={"X-Request-Timeout": "0.05"})
        assert response.status_code == 504
        assert not gate.opened.is_set()  # answered while the model was still stuck: the client's 0.05 s, not 10 s
        assert "0.05 s" in response.json()["message"]
        v2 = client.post(
            "/v2/models/mnist-cnn/infer",
            json={
                "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": flat(0.1)}],
                "parameters": {"timeout": 50_000},
            },
        )
        assert v2.status_code == 504
        assert set(v2.json()) == {"error"}
    finally:
        gate.opened.set()
        client.__exit__(None, None, None)


@pytest.mark.parametrize("value", ["soon", "-1", "0", "inf", "nan"])
def test_invalid_deadline_header_is_a_400(client: TestClient, value: str) -> None:
    response = client.post("/v1/predict", json={"pixels": grid(0.1)}, headers={"X-Request-Timeout": value})
    assert response.status_code == 400
    assert "X-Request-Timeout" in response.json()["message"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_json_body_sent_as_another_type_is_refused(client: TestClient, content_type: str) -> None:
    # Browsers send these types cross-site without asking first; JSON must come as JSON.
    body = json.dumps({"pixels": grid(0.5)})
    response = client.post("/v1/predict", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert content_type.split(";")[0] in response.json()["message"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", None])
def test_json_types_and_a_missing_type_are_accepted(client: TestClient, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/predict", content=json.dumps({"pixels": grid(0.5)}), headers=headers)
    assert response.status_code == 200, response.text


def test_options_are_taken_from_the_query_on_both_routes(client: TestClient) -> None:
    canvas = [[0.0] * 56 for _ in range(56)]
    for row in range(10, 46):
        canvas[row][27] = canvas[row][28] = 1.0
    by_query = client.post("/v1/predict?preprocess=true&return_input=true", json={"pixels": canvas})
    by_body = client.post("/v1/predict", json={"pixels": canvas, "preprocess": True, "return_input": True})
    assert by_query.status_code == by_body.status_code == 200
    assert by_query.json() == by_body.json()
    assert len(by_query.json()["input"]) == 28
    image = client.post(
        "/v1/predict/image?return_input=true", content=png(draw_seven()), headers={"Content-Type": "image/png"}
    )
    assert len(image.json()["input"]) == 28


def test_an_option_given_twice_with_different_values_is_refused(client: TestClient) -> None:
    response = client.post("/v1/predict?return_input=false", json={"pixels": grid(0.5), "return_input": True})
    assert response.status_code == 422
    assert "return_input is given twice" in response.json()["message"]


def test_an_image_without_preprocessing_must_already_be_mnist_form(client: TestClient) -> None:
    mnist_like = np.zeros((28, 28), dtype=np.uint8)
    mnist_like[4:24, 10:18] = 255  # a bright block: mean 0.2, the fake model answers 2
    response = client.post(
        "/v1/predict/image?preprocess=false&return_input=true",
        content=png(Image.fromarray(mnist_like)),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200
    assert np.allclose(np.array(response.json()["input"]), mnist_like / 255)  # taken as it is
    too_big = client.post(
        "/v1/predict/image?preprocess=false", content=png(draw_seven()), headers={"Content-Type": "image/png"}
    )
    assert too_big.status_code == 422
    assert "must be 28x28" in too_big.json()["message"]


def test_a_model_answering_the_wrong_width_is_a_model_error_and_the_service_goes_on() -> None:
    class Switchable(torch.nn.Module):
        """MeanIntensityNet, or 3 classes instead of 10 while `wrong` is set."""

        wrong = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 3) if self.wrong else MeanIntensityNet()(x)

    model = Switchable()
    with build_client(Settings(max_batch_wait_ms=0), model=model) as client:
        model.wrong = True
        response = client.post("/v1/predict", json={"pixels": grid(0.3)})
        assert response.status_code == 500
        assert response.json()["error"] == "model_error"
        model.wrong = False
        assert client.post("/v1/predict", json={"pixels": grid(0.3)}).json()["digit"] == 3
