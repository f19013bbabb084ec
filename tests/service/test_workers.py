"""Several worker processes as one service (`python -m service` with DIGIT_WORKERS=2): probes,
metrics and reloads answer for all of them, a dead worker is replaced, a bad start stops all."""

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx2
import pytest

from service.config import Settings
from service.workers import available_cpus
from tests.helpers import probe_image
from tests.service.live import REPO, free_port, running_service, wait_until_ready
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
        for _ in range(60):  # a fresh connection each time, so both workers take some
            response = httpx2.post(f"{service.base_url}/v1/predict", json={"pixels": probe_image().tolist()})
            assert response.status_code == 200
            answered += 1
        metrics = httpx2.get(f"{service.base_url}/metrics").text
        ready = httpx2.get(f"{service.base_url}/readyz").json()
    by_worker = Counter(re.findall(r'"POST /v1/predict" 200 .* worker=(\d)', service.output))
    assert set(by_worker) == {"1", "2"}, by_worker  # both served...
    counted = _metric(metrics, 'digit_http_requests_total{method="POST",route="/v1/predict",status="200"}')
    assert counted == answered  # ...and whichever answered /metrics counted both workers' requests
    assert ready["status"] == "ready"
    assert "Traceback" not in service.output


def _listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on 127.0.0.1:`port` (from /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and local == f"0100007F:{port:04X}":
            inodes.add(inode)
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def test_each_worker_accepts_on_a_socket_of_its_own_so_the_kernel_spreads_connections() -> None:
    """With one shared socket, the idle worker of the moment took every new connection, and keep-alive
    clients stayed where they landed (measured: runs alternated between both workers busy and one
    doing it all). Each worker has its own listening socket on the port (SO_REUSEPORT)."""
    with running_service(TWO) as service:
        listening = _listening_inodes(service.port)
        owned = [_socket_inodes(pid) & listening for pid in _workers(service.process.pid)]
        clients = [httpx2.Client(base_url=service.base_url) for _ in range(16)]  # 16 keep-alive connections
        try:
            for client in clients:
                assert client.post("/v1/predict", json={"pixels": probe_image().tolist()}).status_code == 200
        finally:
            for client in clients:
                client.close()
    assert len(listening) == 2
    assert [len(sockets) for sockets in owned] == [1, 1] and owned[0] != owned[1]
    by_worker = Counter(re.findall(r'"POST /v1/predict" 200 .* worker=(\d)', service.output))
    assert set(by_worker) == {"1", "2"}, by_worker


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
        wait_until_ready(service.base_url, service.process)
        now = _workers(service.process.pid)
        assert len(now) == 2 and first[0] not in now and first[1] in now
        response = httpx2.post(f"{service.base_url}/v1/predict", json={"pixels": probe_image().tolist()})
        assert response.status_code == 200
    died = re.search(r"worker (\d) died", service.output)
    assert died is not None, service.output
    assert any(detail.startswith(f"worker {died.group(1)} of 2 is ") for detail in details), details


def test_a_replacement_worker_serves_the_version_its_siblings_serve(tmp_path: Path) -> None:
    """A newer version on disk that the service has not switched to must not come in through the back
    door of a restart: the replacement starts on the version the others serve."""
    publish(tmp_path, marked_model(1))
    env = {**TWO, "DIGIT_ARTIFACT_DIR": str(tmp_path), "DIGIT_RELOAD_INTERVAL_S": "0"}
    with running_service(env) as service:
        publish(tmp_path, marked_model(2))  # published, not reloaded
        os.kill(_workers(service.process.pid)[0], signal.SIGKILL)
        time.sleep(0.5)
        wait_until_ready(service.base_url, service.process)
        versions = Counter(
            httpx2.get(f"{service.base_url}/v1/model").json()["version"] for _ in range(30)
        )  # fresh connections: both workers answer
    assert versions == Counter({1: 30}), versions


def test_ctrl_c_in_a_terminal_drains_the_workers_instead_of_killing_them() -> None:
    """A terminal sends SIGINT to the whole foreground process group. The workers sit in groups of
    their own, so only the supervisor hears it and asks each to drain once (twice would make uvicorn
    drop what is in flight): during the shutdown delay they still serve, then exit cleanly."""
    env = {**os.environ, **TWO, "DIGIT_PORT": str(free_port()), "DIGIT_SHUTDOWN_DELAY_S": "1.5"}
    base = f"http://127.0.0.1:{env['DIGIT_PORT']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    try:
        wait_until_ready(base, process)
        workers = _workers(process.pid)
        assert all(os.getpgid(pid) != process.pid for pid in workers)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does
        time.sleep(0.3)
        during = [
            httpx2.post(f"{base}/v1/predict", json={"pixels": probe_image().tolist()}).status_code for _ in range(10)
        ]
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert during == [200] * 10  # the shutdown delay serves as usual: no forced exit
    assert process.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.count("Application shutdown complete") == 2  # both drained


def test_workers_do_not_outlive_a_killed_supervisor() -> None:
    with running_service(TWO) as service:
        workers = _workers(service.process.pid)
        service.process.kill()
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker kept running (and holding the port)"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


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
    settings = Settings(workers=workers, cpu_threads=threads, device="cpu").for_workers(cpus)
    assert (settings.workers, settings.cpu_threads) == expected


def test_one_worker_by_default_on_a_gpu() -> None:
    assert Settings(device="cuda").for_workers(16).workers == 1
    assert Settings(device="cuda", workers=3).for_workers(16).workers == 3


def test_a_cgroup_cpu_limit_caps_the_cpus(tmp_path: Path) -> None:
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs: rounds up to 2
    assert available_cpus(limit) == min(2, len(os.sched_getaffinity(0)))
    limit.write_text("max 100000\n")
    assert available_cpus(limit) == len(os.sched_getaffinity(0))


def test_a_second_service_on_the_same_port_is_refused_not_joined() -> None:
    with running_service(TWO) as first:
        second = subprocess.run(
            [sys.executable, "-m", "service"],
            env={**os.environ, **TWO, "DIGIT_PORT": str(first.port)},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert httpx2.get(f"{first.base_url}/readyz").status_code == 200  # the first serves on
    assert second.returncode == 3
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.stderr
