"""Hot reload: a new version is vetted beside the serving one and switched in without failures."""

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from model_artifact import (
    ArtifactError,
    ArtifactMetadata,
    quiet_torchscript,
    read_metadata,
    save_torchscript,
    write_artifact,
)
from model_artifact.torchscript import Autocast
from service import reload as reload_module
from service.app import create_app
from service.config import Settings
from service.reload import Reloader
from tests.helpers import MarkedNet, MeanIntensityNet, probe_image, version_of
from tests.service.images import png

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "artifacts" / "mnist-cnn" / "1"
PIXELS = {"pixels": [0.0] * 784}


def publish(root: Path, write_model, metadata: ArtifactMetadata | None = None, **changes: object) -> Path:
    """Publish a new version the way the trainer does (atomically), reusing the default's metadata."""
    base = metadata or read_metadata(DEFAULT)
    return write_artifact(
        root,
        "mnist-cnn",
        write_model,
        lambda version, sha: base.model_copy(update={"version": version, "model_sha256": sha, **changes}),
    )


def copy_default_model(path: Path) -> None:
    shutil.copyfile(DEFAULT / "model.pt", path)


def digit_blind_model(path: Path) -> None:
    save_torchscript(MeanIntensityNet(), path, torch.zeros(1, 1, 28, 28))


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    publish(tmp_path, copy_default_model)  # version 1
    return tmp_path


@pytest.fixture
def watching(artifacts: Path) -> Iterator[TestClient]:
    settings = Settings(artifact_dir=artifacts, reload_interval_s=0.1, max_batch_size=8, admin_tokens=["admin"])
    with TestClient(create_app(settings, metrics_registry=CollectorRegistry())) as client:
        yield client


def wait_for_version(client: TestClient, version: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").json()["model"]["version"] != version:
        assert time.monotonic() < deadline, f"never switched to version {version}"
        time.sleep(0.05)


def test_steady_traffic_through_a_reload_fails_no_request(watching: TestClient, artifacts: Path) -> None:
    seen: list[list[int]] = [[] for _ in range(4)]
    failures: list[str] = []
    stop = threading.Event()

    def traffic(lane: list[int]) -> None:
        while not stop.is_set():
            response = watching.post("/v1/predict", json=PIXELS)
            if response.status_code != 200:
                failures.append(response.text)
            else:
                lane.append(int(response.headers["X-Model-Version"]))

    threads = [threading.Thread(target=traffic, args=(lane,)) for lane in seen]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    publish(artifacts, copy_default_model)  # version 2 appears on disk, as the trainer writes it
    wait_for_version(watching, 2)
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()

    assert failures == []
    assert {v for lane in seen for v in lane} == {1, 2}
    for lane in seen:  # each client sees the switch once and never goes back
        assert lane == sorted(lane)
    metrics = watching.get("/metrics", headers={"Authorization": "Bearer admin"}).text
    assert 'digit_model_reloads_total{outcome="reloaded"} 1.0' in metrics
    assert 'digit_model_info{name="mnist-cnn",version="2"} 1.0' in metrics


def test_a_version_that_fails_the_known_digits_check_is_refused(watching: TestClient, artifacts: Path) -> None:
    publish(artifacts, digit_blind_model)  # version 2: valid files, wrong answers
    deadline = time.monotonic() + 10
    while 'outcome="refused"} 1.0' not in watching.get("/metrics").text:
        assert time.monotonic() < deadline, "the bad version was never looked at"
        time.sleep(0.05)
    assert watching.post("/v1/predict", json=PIXELS).headers["X-Model-Version"] == "1"  # still serving
    refused = watching.post("/v1/admin/reload", headers={"Authorization": "Bearer admin"})
    assert refused.status_code == 409
    assert "sanity check failed" in refused.json()["message"]
    assert "still serving version 1" in refused.json()["message"]


def test_a_tampered_version_is_refused(watching: TestClient, artifacts: Path) -> None:
    version_dir = publish(artifacts, copy_default_model)
    with (version_dir / "model.pt").open("ab") as f:
        f.write(b"tampered")
    response = watching.post("/v1/admin/reload", headers={"Authorization": "Bearer admin"})
    assert response.status_code == 409
    assert "SHA-256 mismatch" in response.json()["message"]
    assert watching.get("/readyz").json()["model"]["version"] == 1


def test_admin_reload_switches_or_says_unchanged_and_needs_its_token(watching: TestClient, artifacts: Path) -> None:
    assert watching.post("/v1/admin/reload").status_code == 401
    admin = {"Authorization": "Bearer admin"}
    assert watching.post("/v1/admin/reload", headers=admin).json() == {
        "status": "unchanged",
        "previous_version": 1,
        "serving_version": 1,
        "workers": 1,
        "workers_switched": 1,
    }


def test_admin_reload_without_watching(artifacts: Path) -> None:
    settings = Settings(artifact_dir=artifacts, reload_interval_s=0, max_batch_size=4, admin_tokens=["admin"])
    with TestClient(create_app(settings, metrics_registry=CollectorRegistry())) as client:
        publish(artifacts, copy_default_model)
        time.sleep(0.3)
        assert client.get("/readyz").json()["model"]["version"] == 1  # no watcher: nothing happens by itself
        response = client.post("/v1/admin/reload", headers={"Authorization": "Bearer admin"})
        assert response.json() == {
            "status": "reloaded",
            "previous_version": 1,
            "serving_version": 2,
            "workers": 1,
            "workers_switched": 1,
        }
        assert client.post("/v1/predict", json=PIXELS).headers["X-Model-Version"] == "2"


def test_start_up_refuses_a_model_that_fails_the_known_digits_check(tmp_path: Path) -> None:
    publish(tmp_path, digit_blind_model)
    with (
        pytest.raises(ArtifactError, match="sanity check failed"),
        TestClient(create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())),
    ):
        pass


def test_start_up_refuses_metadata_whose_input_spec_does_not_match(tmp_path: Path) -> None:
    metadata = read_metadata(DEFAULT)
    odd_input = metadata.input.model_copy(update={"shape": [None, 1, 32, 32]})
    publish(tmp_path, copy_default_model, metadata=metadata.model_copy(update={"input": odd_input}))
    with (
        pytest.raises(ArtifactError, match="does not match what the service feeds"),
        TestClient(create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())),
    ):
        pass


def marked_model(version: int):
    """Version `version` of the default model, answering probe images with its own version."""

    def write(path: Path) -> None:
        with quiet_torchscript():
            inner = torch.jit.load(str(DEFAULT / "model.pt"))
        save_torchscript(MarkedNet(inner, version), path, torch.zeros(1, 1, 28, 28))

    return write


def test_under_load_through_three_reloads_every_answer_comes_from_one_version(tmp_path: Path) -> None:
    """Versions answer differently (a probe image names its version in digit and logits; each has its
    own temperature). Whatever the watcher installs meanwhile, every response's body, header, digit
    and logits name one and the same version."""
    publish(tmp_path, marked_model(1))
    settings = Settings(
        artifact_dir=tmp_path, reload_interval_s=0.05, max_batch_size=8, max_batch_wait_ms=2, max_queue_delay_ms=10_000
    )
    probe = probe_image()
    pixels = {"pixels": probe.tolist()}
    image = png(Image.fromarray((probe.numpy() * 255).astype(np.uint8)))
    tensor = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": probe.flatten().tolist()}]}
    mismatches: list[object] = []
    seen: set[int] = set()
    stop = threading.Event()

    def check(response) -> None:
        if response.status_code != 200:
            mismatches.append(response.text)
            return
        body = response.json()
        names = {"header": int(response.headers["X-Model-Version"])}
        if "outputs" in body:
            outputs = {o["name"]: o for o in body["outputs"]}
            names |= {
                "body": int(body["model_version"]),
                "digit": outputs["digit"]["data"][0],
                "logits": version_of(outputs["logits"]["data"]),
            }
        else:
            names |= {"body": body["model"]["version"], "digit": body["digit"]}
        if len({v % 10 for v in names.values()}) != 1:
            mismatches.append(names)
        seen.add(names["header"])

    def traffic(client: TestClient, lane: int) -> None:
        while not stop.is_set():
            kind = lane % 3
            if kind == 0:
                check(client.post("/v1/predict", json=pixels))
            elif kind == 1:
                headers = {"Content-Type": "image/png"}
                check(client.post("/v1/predict/image?preprocess=false", content=image, headers=headers))
            else:
                check(client.post("/v2/models/mnist-cnn/infer", json=tensor))
            lane += 1

    with TestClient(create_app(settings, metrics_registry=CollectorRegistry())) as client:
        threads = [threading.Thread(target=traffic, args=(client, lane)) for lane in range(12)]
        for thread in threads:
            thread.start()
        for version in (2, 3, 4):
            time.sleep(0.2)
            publish(tmp_path, marked_model(version), temperature=float(version))
            wait_for_version(client, version)
        time.sleep(0.2)
        stop.set()
        for thread in threads:
            thread.join()
    assert mismatches == []
    assert seen == {1, 2, 3, 4}


def test_a_refused_version_is_refused_again_cheaply_until_its_files_change(
    watching: TestClient, artifacts: Path
) -> None:
    admin = {"Authorization": "Bearer admin"}
    version_dir = publish(artifacts, digit_blind_model)  # version 2: valid files, wrong answers
    first = watching.post("/v1/admin/reload", headers=admin)
    assert first.status_code == 409
    again = watching.post("/v1/admin/reload", headers=admin)
    assert again.status_code == 409
    assert again.json()["message"] == first.json()["message"]
    metrics = watching.get("/metrics").text
    assert 'digit_model_reloads_total{outcome="refused"} 1.0' in metrics  # vetted once, not on every call

    # The operator fixes version 2 in place (new files, new checksum): it is vetted anew, and the
    # watcher picks it up by itself.
    metadata = read_metadata(version_dir)
    copy_default_model(version_dir / "model.pt")
    fixed = metadata.model_copy(update={"model_sha256": read_metadata(DEFAULT).model_sha256})
    (version_dir / "metadata.json").write_text(fixed.model_dump_json())
    wait_for_version(watching, 2)
    assert watching.post("/v1/predict", json=PIXELS).headers["X-Model-Version"] == "2"


def test_start_up_refuses_a_smoke_test_artifact_unless_allowed(tmp_path: Path) -> None:
    publish(tmp_path, copy_default_model, smoke=True)  # what `trainer train --dry-run` makes
    with (
        pytest.raises(ArtifactError, match="smoke test"),
        TestClient(create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())),
    ):
        pass
    allowed = Settings(artifact_dir=tmp_path, allow_smoke_models=True)
    with TestClient(create_app(allowed, metrics_registry=CollectorRegistry())) as client:
        assert client.get("/readyz").status_code == 200


def test_the_model_route_names_the_precision_the_artifact_computes_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reload_module, "runs_natively", lambda precision, device: True)  # as on an AMX CPU
    publish(tmp_path, copy_default_model)
    publish(tmp_path, copy_default_model, precision="bfloat16")
    with TestClient(create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())) as client:
        assert client.get("/v1/model").json()["precision"] == "bfloat16"
        served = client.app.state.models.model.model
        assert isinstance(served, Autocast)  # the numerics the metadata names, not float32 silently
    pinned = Settings(artifact_dir=tmp_path, model_version=1)
    with TestClient(create_app(pinned, metrics_registry=CollectorRegistry())) as client:
        assert client.get("/v1/model").json()["precision"] == "float32"


def test_a_bfloat16_version_is_passed_over_where_the_hardware_only_emulates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 is several times slower than float32 on CPUs without AMX: there the service serves the
    newest version it runs natively, and says which (never the bfloat16 file in other numerics)."""
    publish(tmp_path, copy_default_model)  # v1, float32
    publish(tmp_path, copy_default_model, precision="bfloat16")  # v2
    monkeypatch.setattr(reload_module, "runs_natively", lambda precision, device: precision == "float32")
    with TestClient(create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())) as client:
        info = client.get("/v1/model").json()
        assert (info["version"], info["precision"]) == (1, "float32")
        assert client.post("/v1/predict", json=PIXELS).headers["X-Model-Version"] == "1"
    pinned = Settings(artifact_dir=tmp_path, model_version=2)  # asked for by number: served as asked
    with TestClient(create_app(pinned, metrics_registry=CollectorRegistry())) as client:
        assert client.get("/v1/model").json()["precision"] == "bfloat16"
    monkeypatch.setattr(reload_module, "runs_natively", lambda precision, device: True)  # an AMX CPU
    with TestClient(create_app(Settings(artifact_dir=tmp_path), metrics_registry=CollectorRegistry())) as client:
        assert client.get("/v1/model").json()["version"] == 2


async def test_a_transient_failure_is_retried_but_a_bad_version_is_remembered(artifacts: Path) -> None:
    publish(artifacts, copy_default_model)  # v2
    current = SimpleNamespace(version=1)
    attempts: list[str] = []

    def flaky(version_dir: Path):
        attempts.append(version_dir.name)
        raise MemoryError("out of memory while loading") if len(attempts) == 1 else ArtifactError("bad digits")

    reloader = Reloader(Settings(artifact_dir=artifacts), lambda: current, lambda model: None, prepare=flaky)
    for _ in range(3):
        with pytest.raises(ArtifactError, match="refused"):
            await reloader.reload()
    assert attempts == ["2", "2"]  # the memory error was not held against the version; the bad digits were
