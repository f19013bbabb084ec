"""Access control, security headers and what errors reveal."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from tests.service.conftest import build_client

REPO = Path(__file__).resolve().parents[2]
PIXELS = {"pixels": [0.3] * 784}
V2_BODY = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.3] * 784}]}


@pytest.fixture
def secured(tmp_path: Path) -> TestClient:
    token_file = tmp_path / "tokens"
    token_file.write_text("# prediction tokens\nfrom-file-token\n\n")
    settings = Settings(
        api_tokens=["inline-token"],
        api_tokens_file=token_file,
        admin_tokens=["admin-token"],
        metrics_require_token=True,
    )
    with build_client(settings) as client:
        yield client


def test_prediction_routes_need_a_valid_bearer_token(secured: TestClient) -> None:
    missing = secured.post("/v1/predict", json=PIXELS)
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = secured.post("/v1/predict", json=PIXELS, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    assert "not valid" in wrong.json()["message"]
    assert secured.post("/v1/predict", json=PIXELS, headers={"Authorization": "Basic inline-token"}).status_code == 401
    for token in ("inline-token", "from-file-token"):
        assert secured.post("/v1/predict", json=PIXELS, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    image = secured.post("/v1/predict/image", content=b"x", headers={"Content-Type": "image/png"})
    assert image.status_code == 401


def test_v2_inference_needs_the_token_and_answers_in_protocol_form(secured: TestClient) -> None:
    refused = secured.post("/v2/models/mnist-cnn/infer", json=V2_BODY)
    assert refused.status_code == 401
    assert set(refused.json()) == {"error"}
    allowed = secured.post("/v2/models/mnist-cnn/infer", json=V2_BODY, headers={"Authorization": "Bearer inline-token"})
    assert allowed.status_code == 200


def test_probes_and_metadata_stay_open_and_metrics_can_be_closed(secured: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/ready", "/v1/model", "/v2/models/mnist-cnn"):
        assert secured.get(path).status_code == 200, path
    assert secured.get("/metrics").status_code == 401
    assert secured.get("/metrics", headers={"Authorization": "Bearer inline-token"}).status_code == 401
    assert secured.get("/metrics", headers={"Authorization": "Bearer admin-token"}).status_code == 200


def test_predictions_and_metrics_are_open_by_default_but_admin_routes_are_closed(client: TestClient) -> None:
    assert client.post("/v1/predict", json=PIXELS).status_code == 200
    assert client.get("/metrics").status_code == 200
    reload = client.post("/v1/admin/reload")
    assert reload.status_code == 403  # no admin token configured: closed, not open to anyone
    assert "DIGIT_ADMIN_TOKENS" in reload.json()["message"]
    assert client.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"}).status_code == 403


def test_admin_routes_need_the_admin_token(secured: TestClient) -> None:
    assert secured.post("/v1/admin/reload").status_code == 401
    assert secured.post("/v1/admin/reload", headers={"Authorization": "Bearer inline-token"}).status_code == 401
    # With the token the route is reached (this app serves an injected model, so there is nothing to reload).
    allowed = secured.post("/v1/admin/reload", headers={"Authorization": "Bearer admin-token"})
    assert allowed.status_code == 409


def test_openapi_shows_the_bearer_security_schemes(client: TestClient) -> None:
    spec = client.app.openapi()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["api_token"] == {**schemes["api_token"], "type": "http", "scheme": "bearer"}
    assert schemes["admin_token"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/predict"]["post"]["security"] == [{"api_token": []}]
    assert spec["paths"]["/v2/models/{name}/infer"]["post"]["security"] == [{"api_token": []}]
    assert spec["paths"]["/v1/admin/reload"]["post"]["security"] == [{"admin_token": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_metrics_behind_a_token_needs_admin_tokens_configured() -> None:
    with pytest.raises(ValueError, match="metrics_require_token needs admin tokens"):
        Settings(metrics_require_token=True)


def test_an_unreadable_token_file_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read token file"):
        build_client(Settings(api_tokens_file=tmp_path / "absent"))


def test_security_headers(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI needs its own assets


def test_cors_is_closed_by_default_and_opens_only_for_configured_origins() -> None:
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    with build_client() as closed:
        assert "access-control-allow-origin" not in closed.options("/v1/predict", headers=preflight).headers
        assert (
            "access-control-allow-origin"
            not in closed.post("/v1/predict", json=PIXELS, headers={"Origin": "https://elsewhere.example"}).headers
        )
    with build_client(Settings(cors_origins=["https://app.example"])) as open_:
        allowed = open_.options("/v1/predict", headers={**preflight, "Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = open_.options("/v1/predict", headers=preflight)
        assert "access-control-allow-origin" not in other.headers


def test_cors_lets_browsers_send_the_deadline_and_read_retry_after() -> None:
    origin = "https://app.example"
    with build_client(Settings(cors_origins=[origin])) as client:
        preflight = client.options(
            "/v1/predict",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-request-timeout, x-request-id",
            },
        )
        assert preflight.status_code == 200, preflight.text
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "x-request-timeout" in allowed and "x-request-id" in allowed
        response = client.post("/v1/predict", json=PIXELS, headers={"Origin": origin})
        exposed = response.headers["access-control-expose-headers"].lower()
        for header in ("retry-after", "x-model-version", "x-request-id", "server-timing"):
            assert header in exposed


def test_errors_reveal_no_paths_or_stack_traces(client: TestClient) -> None:
    for response in (
        client.post("/v1/predict", content=b"{bad"),
        client.post(
            "/v1/predict/image", content=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, headers={"Content-Type": "image/png"}
        ),
        client.get("/nowhere"),
    ):
        assert response.status_code < 500
        assert "Traceback" not in response.text
        assert str(REPO) not in response.text and "site-packages" not in response.text
