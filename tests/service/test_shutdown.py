"""SIGTERM on a real server under load: readiness turns 503 at once, nothing accepted is dropped."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2

REPO = Path(__file__).resolve().parents[2]
PIXELS = {"pixels": [0.0] * 784}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_under_load_drains_without_dropping_accepted_requests() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DIGIT_PORT": str(port), "DIGIT_SHUTDOWN_DELAY_S": "1.5", "DIGIT_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx2.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx2.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "server did not start"
        time.sleep(0.2)

    outcomes: dict[str, int] = {"ok": 0, "refused_503": 0, "dropped": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        # Like a load balancer's backend: keep sending until the server says it is going away.
        with httpx2.Client(base_url=base, timeout=10) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/predict", json=PIXELS)
                except httpx2.TransportError:
                    with lock:
                        outcomes["dropped"] += 1
                    return
                with lock:
                    if response.status_code == 200:
                        outcomes["ok"] += 1
                    elif response.status_code == 503 and response.headers.get("retry-after"):
                        outcomes["refused_503"] += 1
                        return
                    else:
                        outcomes["dropped"] += 1
                        return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # steady load
    with lock:
        served_before = outcomes["ok"]
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    # Readiness turns 503 at once, on a fresh connection, while the listener is still open.
    readiness = httpx2.get(f"{base}/readyz", timeout=2)
    readiness_after_s = time.monotonic() - signalled
    for thread in threads:
        thread.join(timeout=20)
    stop.set()
    output, _ = process.communicate(timeout=30)
    exited_after_s = time.monotonic() - signalled

    assert readiness.status_code == 503, readiness.text
    assert readiness.json()["detail"] == "shutting down"
    assert readiness_after_s < 1.0
    assert served_before > 0
    assert outcomes["dropped"] == 0, outcomes
    assert outcomes["refused_503"] == 8, outcomes  # every client was told to go away, cleanly
    assert process.returncode in (0, -signal.SIGTERM), output
    assert exited_after_s < 15  # delay (1.5 s) + drain, well inside the grace period
    assert "Traceback" not in output
