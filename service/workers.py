"""Several worker processes behind one listening socket, each a whole service.

Python runs one thread of Python at a time per process, and HTTP parsing, image decoding,
preprocessing and rendering are all Python: one process tops out near one core however many
the machine has. So the service runs several processes (by default one per CPU it may use),
each with its own model, batcher and event loop, all accepting on one socket that this
supervisor binds. The supervisor itself serves nothing:

- it starts the workers (spawned, not forked: torch's thread pools do not survive a fork);
- it passes SIGTERM and SIGINT on, and each worker drains on its own (`server.GracefulServer`);
- it restarts a worker that dies after having served, and gives up (exit 3) if one dies while
  starting, since the next would fail the same way (a bad artifact, say);
- it gives the workers a `WorkerBoard` (probes and reloads for all) and a directory where
  prometheus_client keeps every worker's metrics, and removes that directory at the end.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn

from service.board import WorkerBoard, WorkerState
from service.config import Settings
from service.metrics import MULTIPROCESS_ENV

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0  # between restarts of a worker that keeps dying


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup (v2) CPU quota such as a
    Kubernetes or Docker CPU limit."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))  # a 1.5-CPU limit gives 2
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _worker_main(settings: Settings, index: int, board: WorkerBoard, sockets: list[socket.socket]) -> None:
    """One worker process: a whole app on the shared socket."""
    from service.app import create_app
    from service.logging_setup import configure_logging
    from service.server import build_server

    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, board=board, worker_index=index)
    server = build_server(app, settings)
    server.run(sockets=sockets)
    raise SystemExit(0 if server.started else 3)


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self._context = multiprocessing.get_context("spawn")
        self.board = WorkerBoard(workers, self._context)
        self._processes: list[BaseProcess | None] = [None] * workers
        self._served = [False] * workers  # has the worker in this slot ever been ready?
        self._signals: list[int] = []
        self._socket: socket.socket | None = None

    def run(self) -> int:
        """Serve until signalled; the exit code: 0, or 3 when a worker could not start."""
        metrics_dir = tempfile.mkdtemp(prefix="digit-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir  # the workers inherit it
        config = uvicorn.Config("service.app:create_app", host=self.settings.host, port=self.settings.port)
        self._socket = config.bind_socket()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("starting %d workers on %s:%d", self.workers, self.settings.host, self.settings.port)
        try:
            for index in range(self.workers):
                self._start(index)
            return self._supervise()
        finally:
            self._socket.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, sig: int, frame: object) -> None:
        # At once, not at the next turn of the loop: readiness must turn 503 before any worker
        # answers another probe.
        self.board.shut_down()
        self._signal_all(sig)
        self._signals.append(sig)

    def _start(self, index: int) -> None:
        self.board.reset(index)
        process = self._context.Process(
            target=_worker_main,
            args=(self.settings, index, self.board, [self._socket]),
            name=f"digit-worker-{index + 1}",
        )
        process.start()
        self._processes[index] = process
        self._served[index] = False

    def _supervise(self) -> int:
        exit_code = 0
        stopping_since: float | None = None
        grace_s = self.settings.shutdown_delay_s + 2 * self.settings.request_timeout_s + 15
        restarts: dict[int, float] = {}  # slot -> when it may start again
        while True:
            while self._signals:
                sig = self._signals.pop(0)
                if stopping_since is None:
                    log.info("received %s: stopping %d workers", signal.Signals(sig).name, self.workers)
                    stopping_since = time.monotonic()
            alive = [p for p in self._processes if p is not None and p.is_alive()]
            if stopping_since is not None:
                if not alive:
                    break
                if time.monotonic() - stopping_since > grace_s:
                    log.error("workers still running %.0f s after the signal; killing them", grace_s)
                    for process in alive:
                        process.kill()
                    break
            for index, process in enumerate(self._processes):
                if process is not None and self.board.state(index) is WorkerState.READY:
                    self._served[index] = True
                if process is None or process.is_alive():
                    continue
                self._processes[index] = None
                self._mark_dead(process)
                if stopping_since is not None:
                    continue
                if not self._served[index]:
                    log.error(
                        "worker %d exited while starting (exit code %s); stopping the service",
                        index + 1,
                        process.exitcode,
                    )
                    exit_code = 3
                    stopping_since = time.monotonic()
                    self.board.shut_down()
                    self._signal_all(signal.SIGTERM)
                    continue
                log.warning("worker %d died (exit code %s); starting a new one", index + 1, process.exitcode)
                self.board.reset(index)
                restarts[index] = time.monotonic() + RESTART_BACKOFF_S
            for index, when in list(restarts.items()):
                if stopping_since is None and time.monotonic() >= when:
                    del restarts[index]
                    self._start(index)
            sentinels = [p.sentinel for p in self._processes if p is not None]
            wait(sentinels, timeout=0.25) if sentinels else time.sleep(0.25)
        for process in self._processes:
            if process is not None:
                process.join(timeout=5)
                self._mark_dead(process)
        log.info("all workers stopped")
        return exit_code

    def _signal_all(self, sig: int) -> None:
        for process in self._processes:
            if process is not None and process.is_alive() and process.pid is not None:
                os.kill(process.pid, sig)

    @staticmethod
    def _mark_dead(process: BaseProcess) -> None:
        """Drop a dead worker's live gauges (in flight, queue depth, model) from /metrics."""
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid)
