"""The prediction routes' lean request path: query flags read by the route itself, the API token
checked without dependency injection, errors rendered by the edge, and the docs unchanged."""

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from service.app import create_app
from service.config import Settings
from service.predictor import Predictor
from service.routes.prediction_route import PredictionRoute
from tests.helpers import MeanIntensityNet, make_metadata
from tests.service.conftest import build_client
from tests.service.images import draw_seven, png

PIXELS = {"pixels": [[0.3] * 28 for _ in range(28)]}


@pytest.mark.parametrize("value", ["maybe", "", "2"])
def test_a_query_flag_that_is_not_a_boolean_is_refused_naming_it(client: TestClient, value: str) -> None:
    pixels = client.post(f"/v1/predict?return_input={value}", json=PIXELS)
    image = client.post(
        f"/v1/predict/image?preprocess={value}", content=png(draw_seven()), headers={"Content-Type": "image/png"}
    )
    for response, name in ((pixels, "return_input"), (image, "preprocess")):
        assert response.status_code == 422
        body = response.json()
        assert body["error"] == "invalid_input"
        field = f"query.{name}"
        assert body["message"].startswith(f"{field}: expected a boolean")
        assert body["details"] == [{"field": field, "problem": body["message"].removeprefix(f"{field}: ")}]
    assert client.post("/v1/predict", json=PIXELS).status_code == 200  # and it keeps serving


@pytest.mark.parametrize(("value", "given"), [("yes", True), ("1", True), ("on", True), ("off", False), ("0", False)])
def test_query_flags_take_the_usual_spellings_of_a_boolean(client: TestClient, value: str, given: bool) -> None:
    body = client.post(f"/v1/predict?return_input={value}", json=PIXELS).json()
    assert ("input" in body) is given


def test_a_repeated_query_flag_counts_its_last_value(client: TestClient) -> None:
    body = client.post("/v1/predict?return_input=false&other=1&return_input=true", json=PIXELS).json()
    assert "input" in body


def test_the_docs_still_show_the_query_flags_and_the_token(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/predict/image"):
        operation = spec["paths"][path]["post"]
        flags = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
        assert set(flags) == {"return_input", "preprocess"}
        assert all(flag["schema"] == {"type": "boolean"} and not flag["required"] for flag in flags.values())
        assert operation["security"] == [{"api_token": []}]


def test_a_prediction_route_refuses_dependencies_it_would_not_run() -> None:
    async def endpoint(request) -> None: ...

    with pytest.raises(TypeError, match="runs no dependencies"):
        PredictionRoute("/v1/x", endpoint, methods=["POST"], dependencies=[Depends(lambda: None)])

    def blocking(request) -> None: ...

    with pytest.raises(TypeError, match="async def"):
        PredictionRoute("/v1/x", blocking, methods=["POST"])


def test_an_unexpected_error_on_the_direct_path_is_a_json_500_and_the_service_goes_on() -> None:
    registry = CollectorRegistry()
    predictor = Predictor(MeanIntensityNet(), make_metadata())
    app = create_app(Settings(max_batch_wait_ms=0), predictor=predictor, metrics_registry=registry)
    with TestClient(app, raise_server_exceptions=False) as client:
        pipeline = app.state.pipeline
        real_run = pipeline.run

        async def broken_run(*args, **kwargs):
            raise RuntimeError("/secret/path exploded")

        pipeline.run = broken_run
        response = client.post("/v1/predict", json=PIXELS, headers={"X-Request-ID": "req-1"})
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error", "message": "internal server error"}
        assert response.headers["X-Request-ID"] == "req-1"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        pipeline.run = real_run
        assert client.post("/v1/predict", json=PIXELS).status_code == 200
    exposition = generate_latest(registry).decode()
    assert 'digit_http_requests_total{method="POST",route="/v1/predict",status="500"} 1.0' in exposition


def test_the_api_token_is_checked_on_the_direct_path() -> None:
    with build_client(Settings(api_tokens=["sesame"], max_batch_wait_ms=0)) as client:
        missing = client.post("/v1/predict", json=PIXELS)
        wrong = client.post("/v1/predict", json=PIXELS, headers={"Authorization": "Bearer nope"})
        right = client.post("/v1/predict", json=PIXELS, headers={"Authorization": "Bearer sesame"})
        protocol = client.post("/v2/models/tiny/infer", json={"inputs": []})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["error"] == "unauthorized"
    assert protocol.status_code == 401 and set(protocol.json()) == {"error"}  # the protocol's error shape


def test_request_ids_made_up_for_clients_are_distinct_32_hex_digits(client: TestClient) -> None:
    made = [client.post("/v1/predict", json=PIXELS).headers["X-Request-ID"] for _ in range(3)]
    made.append(client.get("/healthz").headers["X-Request-ID"])
    made.append(client.post("/v1/predict", json=PIXELS, headers={"X-Request-ID": "bad id;"}).headers["X-Request-ID"])
    assert len(set(made)) == len(made)
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in made)


@pytest.mark.parametrize("enabled", [False, True])
def test_fastapis_native_telemetry_follows_the_setting(enabled: bool) -> None:
    app = create_app(Settings(opentelemetry=enabled), predictor=Predictor(MeanIntensityNet(), make_metadata()))
    assert all(app._telemetry[signal] is enabled for signal in ("tracing", "metrics", "logs"))
