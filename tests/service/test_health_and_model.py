import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from model_artifact import ArtifactError, ArtifactMetadata
from service.app import create_app
from service.config import Settings
from tests.service.conftest import build_client

REPO = Path(__file__).resolve().parents[2]


def test_liveness(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_once_the_model_is_loaded(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "model": {"name": "tiny", "version": 1}}


def test_not_ready_before_start_up() -> None:
    client = build_client()  # not entered: the lifespan has not loaded anything
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not ready"
    assert client.post("/v1/predict", json={"pixels": [0.0] * 784}).status_code == 503
    assert client.get("/healthz").status_code == 200  # alive all the same


def test_draining_turns_readiness_off_but_keeps_serving(client: TestClient) -> None:
    lifecycle = client.app.state.lifecycle
    lifecycle.draining = True  # what SIGTERM does, for the shutdown delay
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["detail"] == "shutting down"
    assert client.get("/v2/health/ready").status_code == 400
    # Load balancers are still deregistering this instance: what they send meanwhile is served.
    predict = client.post("/v1/predict", json={"pixels": [0.5] * 784})
    assert predict.status_code == 200
    assert predict.json()["digit"] == 5
    assert client.get("/healthz").status_code == 200


def test_a_stopped_batcher_is_not_ready_and_refuses_predictions(client: TestClient) -> None:
    client.portal.call(client.app.state.lifecycle.batcher.stop)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["detail"] == "the batcher is not running"
    predict = client.post("/v1/predict", json={"pixels": [0.5] * 784})
    assert predict.status_code == 503
    assert predict.headers["Retry-After"] == "1"


def test_liveness_fails_when_the_batchers_collector_dies(client: TestClient) -> None:
    batcher = client.app.state.lifecycle.batcher
    assert client.get("/healthz").json() == {"status": "ok"}

    def broken_collector() -> list:
        raise RuntimeError("collector bug")

    batcher._take_batch = broken_collector  # a bug in the collector itself: it dies on the next batch
    response = client.post("/v1/predict", json={"pixels": [0.5] * 784})
    assert response.status_code == 503
    liveness = client.get("/healthz")
    assert liveness.status_code == 503  # the orchestrator restarts the process instead of waiting forever
    assert liveness.json()["status"] == "failing"
    assert "collector died: RuntimeError: collector bug" in liveness.json()["detail"]
    assert client.get("/v2/health/live").status_code == 400
    assert client.get("/readyz").status_code == 503


def test_model_metadata(client: TestClient) -> None:
    response = client.get("/v1/model")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "tiny"
    assert body["version"] == 1
    assert body["test_accuracy"] == 0.9975
    assert body["input"]["shape"] == [None, 1, 28, 28]
    assert body["input"]["polarity"] == "white-on-black"
    assert body["labels"] == [str(d) for d in range(10)]
    assert body["device"] == "cpu"
    assert "created_at" in body
    assert body["training"]["seed"] == 1


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    wrong_method = client.get("/v1/predict")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"


def test_openapi_documents_every_route_with_its_errors(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/predict", "/v1/predict/image", "/v1/model", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    predict = paths["/v1/predict"]["post"]
    assert {"400", "413", "422", "429", "500", "503", "504"} <= set(predict["responses"])
    assert "examples" in predict["requestBody"]["content"]["application/json"]["schema"]
    image = paths["/v1/predict/image"]["post"]
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(image["requestBody"]["content"])
    assert "415" in image["responses"]


def test_docs_pages_work_offline(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200
        assert "http://" not in page.text.replace("http://testserver", "")
        assert "https://" not in page.text  # no CDN: every asset is served by the service itself
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


# --- start-up with real artifacts --------------------------------------------------------


def _copy_default_artifact(tmp_path: Path) -> Path:
    source = REPO / "artifacts" / "mnist-cnn"
    version = max(int(p.name) for p in source.iterdir() if p.name.isdigit())
    target = tmp_path / "mnist-cnn" / str(version)
    shutil.copytree(source / str(version), target)
    return target


def test_start_up_loads_and_verifies_the_committed_artifact(tmp_path: Path) -> None:
    version_dir = _copy_default_artifact(tmp_path)
    app = create_app(Settings(artifact_dir=tmp_path, max_batch_size=4), metrics_registry=CollectorRegistry())
    with TestClient(app) as client:
        ready = client.get("/readyz").json()
        assert ready["model"] == {"name": "mnist-cnn", "version": int(version_dir.name)}


def test_start_up_refuses_a_tampered_model(tmp_path: Path) -> None:
    version_dir = _copy_default_artifact(tmp_path)
    with (version_dir / "model.pt").open("ab") as f:
        f.write(b"tampered")
    app = create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())
    with pytest.raises(ArtifactError, match=r"model\.pt: SHA-256 mismatch"), TestClient(app):
        pass


def test_start_up_refuses_metadata_that_breaks_the_schema(tmp_path: Path) -> None:
    version_dir = _copy_default_artifact(tmp_path)
    metadata = ArtifactMetadata.model_validate_json((version_dir / "metadata.json").read_text())
    (version_dir / "metadata.json").write_text(
        metadata.model_dump_json().replace('"temperature":', '"temperature": -1, "x":')
    )
    app = create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())
    with pytest.raises(ArtifactError, match="does not match the metadata schema"), TestClient(app):
        pass


def test_start_up_names_a_missing_model(tmp_path: Path) -> None:
    app = create_app(Settings(artifact_dir=tmp_path, model_name="absent"), metrics_registry=CollectorRegistry())
    with pytest.raises(ArtifactError, match="no versions of model 'absent'"), TestClient(app):
        pass


def test_lifespan_state_before_inside_and_after() -> None:
    client = build_client()
    lifecycle = client.app.state.lifecycle
    assert lifecycle.readiness() == "the model is not loaded yet"
    with client:
        assert lifecycle.readiness() is None
        assert lifecycle.batcher.running
        assert lifecycle.registry.current().version == 1
    assert lifecycle.readiness() == "shutting down"
    assert not lifecycle.batcher.running


def test_liveness_fails_when_the_collector_was_cancelled(client: TestClient) -> None:
    batcher = client.app.state.lifecycle.batcher

    async def cancel() -> None:
        batcher._task.cancel()

    client.portal.call(cancel)
    deadline = time.monotonic() + 10
    while client.get("/healthz").status_code != 503:
        assert time.monotonic() < deadline, "liveness never noticed"
        time.sleep(0.01)
    assert "collector has stopped" in client.get("/healthz").json()["detail"]
