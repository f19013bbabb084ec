"""SIGTERM on a real server under load: readiness turns 503 at once, nothing accepted is dropped."""

import signal
import threading
import time

import httpx2

from tests.service.live import LiveService, running_service

PIXELS = {"pixels": [0.0] * 784}


def test_sigterm_under_load_drains_without_dropping_accepted_requests() -> None:
    with running_service({"DIGIT_SHUTDOWN_DELAY_S": "1.5", "DIGIT_LOG_LEVEL": "warning"}) as service:
        readiness, readiness_after_s, outcomes, served_before, exited_after_s = _sigterm_under_load(service)
    output = service.output
    process = service.process

    assert readiness.status_code == 503, readiness.text
    assert readiness.json()["detail"] == "shutting down"
    assert readiness_after_s < 1.0
    assert served_before > 0
    assert outcomes["dropped"] == 0, outcomes
    assert outcomes["refused_503"] == 8, outcomes  # every client was told to go away, cleanly
    assert process.returncode in (0, -signal.SIGTERM), output
    assert exited_after_s < 15  # delay (1.5 s) + drain, well inside the grace period
    assert "Traceback" not in output


def _sigterm_under_load(service: LiveService) -> tuple[httpx2.Response, float, dict[str, int], int, float]:
    base = service.base_url
    process = service.process
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
    process.wait(timeout=30)
    exited_after_s = time.monotonic() - signalled
    return readiness, readiness_after_s, outcomes, served_before, exited_after_s
