"""`python -m service` as a process: the command the README and the containers run."""

import os
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx

from tests.service.live import REPO, free_port, running_service


def test_the_server_starts_on_the_committed_model_and_becomes_ready() -> None:
    env = {"DIGIT_MAX_BATCH_SIZE": "8", "DIGIT_LOG_FORMAT": "json", "DIGIT_MAX_BATCH_WIAT_MS": "5"}
    with running_service(env, args=["--host", "127.0.0.1", "--port", str(free_port())]) as service:
        response = httpx.post(
            f"{service.base_url}/v1/predict",
            json={"pixels": [0.0] * 784},
            headers={"X-Request-ID": "client-chosen-42"},
            timeout=5,
        )
        assert response.status_code == 200
        assert response.headers["x-model-version"]
        assert response.headers["x-request-id"] == "client-chosen-42"  # echoed
        page = httpx.get(f"{service.base_url}/", timeout=5)
        assert page.status_code == 200
        generated = page.headers["x-request-id"]  # none sent: one is made up
        assert len(generated) == 32
    output = service.output
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert service.process.returncode in (0, -15), output
    assert '"message": "ready: serving mnist-cnn' in output
    assert '"message": "stopped"' in output
    assert "start-up objects out of garbage collection" in output  # the heap frozen once ready
    assert '"level": "error"' not in output
    assert "/readyz" not in output  # probes stay out of the access log
    # The access log names each request with its ID.
    assert '"logger": "service.access"' in output
    assert 'POST /v1/predict\\" 200' in output and "request_id=client-chosen-42" in output
    assert f"request_id={generated}" in output
    # A misspelled setting is pointed out at start-up instead of being ignored in silence.
    assert "DIGIT_MAX_BATCH_WIAT_MS is not a setting and is ignored; did you mean DIGIT_MAX_BATCH_WAIT_MS?" in output


def test_the_server_refuses_to_start_on_a_missing_model_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "DIGIT_ARTIFACT_DIR": str(tmp_path), "DIGIT_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "refusing to start: no versions of model 'mnist-cnn'" in result.stdout + result.stderr


def test_invalid_settings_exit_with_a_message() -> None:
    env = {**os.environ, "DIGIT_MAX_BATCH_SIZE": "-4"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


def test_one_worker_serves_from_the_process_itself_and_refuses_a_taken_port() -> None:
    with running_service({"DIGIT_WORKERS": "1"}) as service:
        response = httpx.post(f"{service.base_url}/v1/predict", json={"pixels": [0.0] * 784}, timeout=5)
        assert response.status_code == 200
        port = service.base_url.rsplit(":", 1)[1]
        # A second copy on the same port fails at once, before it loads a model.
        env = {**os.environ, "DIGIT_WORKERS": "1", "DIGIT_PORT": port}
        second = subprocess.run(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
    assert service.process.returncode in (0, -15), service.output
    assert service.output.count("start-up objects out of garbage collection") == 1  # one process
    assert "loaded mnist-cnn" in service.output
    # It says where it listens once it does: after the model is ready, not before it loads.
    assert "Uvicorn running on" not in service.output
    ready = service.output.index("ready: serving mnist-cnn")
    assert service.output.index(f"listening on http://127.0.0.1:{port}") > ready
    assert second.returncode == 3
    assert "Address already in use" in second.stdout + second.stderr
    assert "loaded mnist-cnn" not in second.stdout + second.stderr
