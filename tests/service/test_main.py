"""`python -m service` as a process: the command the README and the containers run."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_server_starts_on_the_committed_model_and_becomes_ready() -> None:
    port = free_port()
    env = {**os.environ, "DIGIT_MAX_BATCH_SIZE": "8", "DIGIT_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready in 60 s")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"pixels": [0.0] * 784}, timeout=5)
        assert response.status_code == 200
        assert response.headers["x-model-version"]
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code in (200, 404)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert process.returncode in (0, -15), output
    assert '"message": "ready: serving mnist-cnn' in output
    assert '"message": "stopped"' in output
    assert '"level": "error"' not in output
    assert "/readyz" not in output  # probes stay out of the access log


def test_the_server_refuses_to_start_on_a_missing_model_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "DIGIT_ARTIFACT_DIR": str(tmp_path), "DIGIT_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "no versions of model 'mnist-cnn'" in result.stdout + result.stderr


def test_invalid_settings_exit_with_a_message() -> None:
    env = {**os.environ, "DIGIT_MAX_BATCH_SIZE": "-4"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr
