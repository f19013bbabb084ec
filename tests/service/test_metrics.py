import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.batcher import Batcher
from service.metrics import Metrics
from service.pipeline import Pipeline
from tests.helpers import ExplodingNet
from tests.service.conftest import build_client


def scrape(client: TestClient) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples: list, sample_name: str, **labels: str) -> float:
    matches = [
        s.value for s in samples if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert matches, f"no sample {sample_name} {labels}"
    return sum(matches)


def test_metrics_count_requests_predictions_and_batches(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/v1/predict", json={"pixels": [0.3] * 784}).status_code == 200
    assert client.post("/v1/predict", json={"pixels": [0.3] * 783}).status_code == 422
    client.get("/healthz")
    client.get("/readyz")
    families = scrape(client)

    requests = families["digit_http_requests"]
    assert value(requests, "digit_http_requests_total", route="/v1/predict", status="200") == 3
    assert value(requests, "digit_http_requests_total", route="/v1/predict", status="422") == 1
    assert not [s for s in requests if s.labels.get("route") in ("/healthz", "/readyz", "/metrics")]

    assert (
        value(
            families["digit_http_request_duration_seconds"],
            "digit_http_request_duration_seconds_count",
            route="/v1/predict",
        )
        == 4
    )
    assert value(families["digit_batch_size"], "digit_batch_size_count") == 3
    assert value(families["digit_inference_duration_seconds"], "digit_inference_duration_seconds_count") == 3
    assert value(families["digit_queue_wait_seconds"], "digit_queue_wait_seconds_count") == 3
    assert value(families["digit_predictions"], "digit_predictions_total", digit="3") == 3
    assert value(families["digit_prediction_confidence"], "digit_prediction_confidence_count") == 3
    assert value(families["digit_queue_depth"], "digit_queue_depth") == 0
    assert value(families["digit_http_requests_in_flight"], "digit_http_requests_in_flight") == 0
    assert value(families["digit_model_info"], "digit_model_info", name="tiny", version="1") == 1
    assert value(families["digit_rejected_requests"], "digit_rejected_requests_total", reason="queue_full") == 0


def test_latency_buckets_resolve_milliseconds(client: TestClient) -> None:
    client.post("/v1/predict", json={"pixels": [0.3] * 784})
    buckets = {
        s.labels["le"] for s in scrape(client)["digit_http_request_duration_seconds"] if s.name.endswith("_bucket")
    }
    assert {"0.001", "0.002", "0.005", "0.01"} <= buckets


def test_model_errors_are_counted() -> None:
    with build_client(model=ExplodingNet()) as client:
        client.post("/v1/predict", json={"pixels": [0.5] * 784})
        families = scrape(client)
    assert value(families["digit_model_errors"], "digit_model_errors_total") == 1
    assert value(families["digit_http_requests"], "digit_http_requests_total", route="/v1/predict", status="500") == 1


def test_each_app_has_its_own_registry() -> None:
    with build_client() as first, build_client() as second:
        first.post("/v1/predict", json={"pixels": [0.3] * 784})
        assert value(scrape(second)["digit_predictions"], "digit_predictions_total", digit="3") == 0


def test_the_event_loop_lag_is_a_gauge_operators_can_watch(client: TestClient) -> None:
    """The wait before the service reads a request (CPU overload) counts toward admission; it is shown too."""
    assert "digit_event_loop_lag_seconds" in scrape(client)  # the app's own pipeline reports it
    metrics = Metrics(CollectorRegistry())
    pipeline = Pipeline(Batcher(), metrics, request_timeout_s=1.0)  # its lag is not measured by a task here
    try:
        for _ in range(4):  # late round after round, as under a standing overload
            pipeline.loop_lag.observe(0.055)
    finally:
        pipeline.close()
    assert pipeline.loop_lag.seconds == pytest.approx(0.05)  # what admission counts: lateness beyond the slack
    assert metrics.registry.get_sample_value("digit_event_loop_lag_seconds") == pytest.approx(0.05)
