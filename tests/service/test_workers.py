"""Several worker processes as one service (`python -m service` with DIGIT_WORKERS=2): probes,
metrics and reloads answer for all of them, a dead worker is replaced, a bad start stops all."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from service.config import Settings
from service.workers import available_cpus
from tests.helpers import probe_image
from tests.service.live import REPO, free_port, running_service
from tests.service.test_reload import marked_model, publish

TWO = {"DIGIT_WORKERS": "2", "DIGIT_LOG_LEVEL": "info"}


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (spawned children; not the resource tracker)."""
    children = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_two_workers_answer_as_one_service_with_metrics_summed_over_both() -> None:
    with running_service(TWO) as service:
        assert len(_workers(service.process.pid)) == 2
        answered = 0
        for _ in range(40):  # a fresh connection each time, so both workers take some
            response = httpx2.post(f"{service.base_url}/v1/predict", json={"pixels": probe_image().tolist()})
            assert response.status_code == 200
            answered += 1
        metrics = httpx2.get(f"{service.base_url}/metrics").text
        ready = httpx2.get(f"{service.base_url}/readyz").json()
    counted = _metric(metrics, 'digit_http_requests_total{method="POST",route="/v1/predict",status="200"}')
    assert counted == answered  # whichever worker answered /metrics, it counted both workers' requests
    assert _metric(metrics, "digit_batch_size_count") >= 2  # forward passes in both workers
    assert ready["status"] == "ready"
    assert "Traceback" not in service.output


def test_admin_reload_switches_every_worker_before_it_answers(tmp_path: Path) -> None:
    publish(tmp_path, marked_model(1))
    env = {**TWO, "DIGIT_ARTIFACT_DIR": str(tmp_path), "DIGIT_RELOAD_INTERVAL_S": "0", "DIGIT_ADMIN_TOKENS": "admin"}
    with running_service(env) as service:
        publish(tmp_path, marked_model(2))
        reload = httpx2.post(
            f"{service.base_url}/v1/admin/reload", headers={"Authorization": "Bearer admin"}, timeout=30
        )
        assert reload.status_code == 200, reload.text
        assert reload.json() == {
            "status": "reloaded",
            "previous_version": 1,
            "serving_version": 2,
            "workers": 2,
            "workers_switched": 2,
        }
        versions = set()
        for _ in range(30):  # fresh connections land on both workers: none may still answer v1
            response = httpx2.post(f"{service.base_url}/v1/predict", json={"pixels": probe_image().tolist()})
            versions.add((response.headers["X-Model-Version"], response.json()["digit"]))
        metrics = httpx2.get(f"{service.base_url}/metrics").text
    assert versions == {("2", 2)}
    assert 'digit_model_info{name="mnist-cnn",version="2"} 1.0' in metrics
    assert 'digit_model_info{name="mnist-cnn",version="1"} 0.0' in metrics


def test_a_killed_worker_is_replaced_and_readiness_waits_for_it() -> None:
    with running_service(TWO) as service:
        first = _workers(service.process.pid)
        os.kill(first[0], signal.SIGKILL)
        # Until the replacement has loaded its model the service is not ready: a probe says which worker.
        deadline = time.monotonic() + 5
        details = set()
        while time.monotonic() < deadline:
            body = httpx2.get(f"{service.base_url}/readyz").json()
            if body["status"] != "ready":
                details.add(body["detail"])
            elif details:
                break
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while httpx2.get(f"{service.base_url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready again"
            time.sleep(0.2)
        now = _workers(service.process.pid)
        assert len(now) == 2 and first[0] not in now and first[1] in now
        response = httpx2.post(f"{service.base_url}/v1/predict", json={"pixels": probe_image().tolist()})
        assert response.status_code == 200
    assert any(detail.startswith("worker 1 of 2 is ") for detail in details), details
    assert "worker 1 died" in service.output


def test_a_worker_that_cannot_start_stops_the_service_with_exit_code_3(tmp_path: Path) -> None:
    env = {**os.environ, **TWO, "DIGIT_ARTIFACT_DIR": str(tmp_path), "DIGIT_PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr
    assert "exited while starting" in result.stderr
    assert "no versions" in result.stderr or "not found" in result.stderr or "does not exist" in result.stderr


@pytest.mark.parametrize(
    ("workers", "threads", "cpus", "expected"),
    [(0, None, 2, (2, 1)), (0, None, 4, (4, 1)), (1, None, 2, (1, 2)), (2, None, 5, (2, 2)), (0, 3, 2, (2, 3))],
)
def test_worker_count_and_threads_follow_the_cpus(
    workers: int, threads: int | None, cpus: int, expected: tuple[int, int]
) -> None:
    settings = Settings(workers=workers, cpu_threads=threads).for_workers(cpus)
    assert (settings.workers, settings.cpu_threads) == expected


def test_a_cgroup_cpu_limit_caps_the_cpus(tmp_path: Path) -> None:
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs: rounds up to 2
    assert available_cpus(limit) == min(2, len(os.sched_getaffinity(0)))
    limit.write_text("max 100000\n")
    assert available_cpus(limit) == len(os.sched_getaffinity(0))
