"""SIGTERM on a real server under load: readiness turns 503 at once while the service keeps
serving through the shutdown delay, then it drains; nothing sent is dropped."""

import signal
import threading
import time

import httpx2

from tests.service.live import LiveService, running_service

PIXELS = {"pixels": [0.5] * 784}
DELAY_S = 1.5


def test_sigterm_under_load_keeps_serving_through_the_delay_and_drops_nothing() -> None:
    with running_service(
        {"DIGIT_SHUTDOWN_DELAY_S": str(DELAY_S), "DIGIT_LOG_LEVEL": "warning", "DIGIT_WORKERS": "2"}
    ) as service:
        run = _sigterm_under_load(service)
    output = service.output
    process = service.process

    assert run["readiness_status"] == 503, run
    assert run["readiness_detail"] == "shutting down"
    assert run["readiness_after_s"] < 1.0
    assert run["ok_before"] > 0
    # During the delay the instance still serves: a load balancer may send until it has deregistered it.
    assert run["ok_after_sigterm"] > 0, run
    assert run["failed"] == [], run  # every request sent got its answer: 0 dropped, 0 refused
    assert process.returncode in (0, -signal.SIGTERM), output
    assert DELAY_S <= run["exited_after_s"] < 15  # delay, then drain, well inside the grace period
    assert "Traceback" not in output


def _sigterm_under_load(service: LiveService) -> dict:
    base = service.base_url
    process = service.process
    lock = threading.Lock()
    counts = {"ok": 0}
    failed: list[str] = []
    deregistered = threading.Event()  # the "load balancer" has seen readiness fail

    def client() -> None:
        # Like a load balancer's backend: keep sending until readiness says the instance is going away.
        with httpx2.Client(base_url=base, timeout=10) as http:
            while not deregistered.is_set():
                try:
                    response = http.post("/v1/predict", json=PIXELS)
                except httpx2.TransportError as exc:
                    with lock:
                        failed.append(repr(exc))
                    return
                with lock:
                    if response.status_code == 200:
                        counts["ok"] += 1
                    else:
                        failed.append(f"{response.status_code} {response.text[:200]}")
                        return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # steady load
    with lock:
        ok_before = counts["ok"]
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    # Readiness turns 503 at once, on a fresh connection, while the listener is still open.
    readiness = httpx2.get(f"{base}/readyz", timeout=2)
    readiness_after_s = time.monotonic() - signalled
    time.sleep(0.3)  # the balancer's next probe period: traffic keeps flowing meanwhile
    with lock:
        ok_after_sigterm = counts["ok"] - ok_before
    deregistered.set()
    for thread in threads:
        thread.join(timeout=20)
    process.wait(timeout=30)
    return {
        "readiness_status": readiness.status_code,
        "readiness_detail": readiness.json().get("detail"),
        "readiness_after_s": readiness_after_s,
        "ok_before": ok_before,
        "ok_after_sigterm": ok_after_sigterm,
        "failed": failed,
        "exited_after_s": time.monotonic() - signalled,
    }
