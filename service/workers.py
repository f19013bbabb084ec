"""Several worker processes on one port, each a whole service.

Python runs one thread of Python at a time per process, and HTTP parsing, image decoding,
preprocessing and rendering are all Python: one process tops out near one core however many
the machine has. So the service runs several processes (by default one per CPU it may use),
each with its own model, batcher and event loop, each accepting on a socket of its own on the
port (SO_REUSEPORT, so the kernel spreads connections evenly). The supervisor itself serves
nothing:

- it starts the workers (spawned, not forked: torch's thread pools do not survive a fork), each
  in a process group of its own, so a terminal's Ctrl-C reaches the supervisor only, and each
  set to get SIGTERM should the supervisor itself die;
- on SIGTERM or SIGINT it sends the workers SIGTERM, and each drains on its own
  (`server.GracefulServer`; a second signal skips the shutdown delay, as with one process);
- it replaces a worker that dies or reports failure after having served, starting the new one
  on the version the others serve (retries back off 1, 2, 4... s), and gives up (exit 3) if a
  worker of the first start cannot start, since the next would fail the same way (a bad
  artifact, say), or when a slot fails 5 starts in a row (its process, or binding its socket);
- it gives the workers a `WorkerBoard` (probes and reloads for all) and a directory where
  prometheus_client keeps every worker's metrics, and removes that directory at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
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

from service.board import WorkerBoard, WorkerState
from service.config import Settings
from service.metrics import MULTIPROCESS_ENV
from service.sockets import address, bind_listener, free_port

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 1.0  # before a replacement; doubled for each start in a row that failed
MAX_BACKOFF_S = 30.0
MAX_FAILED_STARTS = 5  # then the service stops (exit 3) and the orchestrator decides


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


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so no worker outlives it
    holding the port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _worker_main(
    settings: Settings,
    index: int,
    board: WorkerBoard,
    sockets: list[socket.socket],
    start_version: int | None,
    supervisor: int,
) -> None:
    """One worker process: a whole app on its own listening socket."""
    os.setpgrp()  # Ctrl-C in a terminal goes to the supervisor, which passes it on as SIGTERM
    _die_with_parent()
    # Told to stop, or orphaned before the death signal was armed (in a container the supervisor
    # is PID 1, so compare with its PID, not with 1).
    if board.shutting_down or os.getppid() != supervisor:
        raise SystemExit(0)
    from service.app import create_app
    from service.logging_setup import configure_logging
    from service.server import build_server

    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, board=board, worker_index=index, start_version=start_version)
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
        self._has_served = False  # has any worker ever been ready?
        self._failed_starts = [0] * workers  # consecutive starts of a slot that never got ready
        self._last_version: int | None = None
        self._signals: list[int] = []
        self._port = settings.port

    def run(self) -> int:
        """Serve until signalled; the exit code: 0, or 3 when a worker could not start."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        metrics_dir = tempfile.mkdtemp(prefix="digit-metrics-")
        os.environ[MULTIPROCESS_ENV] = metrics_dir  # the workers inherit it
        try:
            sockets: list[socket.socket] = []
            try:
                self._port = free_port(self.settings.host, self.settings.port)
                for _ in range(self.workers):
                    sockets.append(bind_listener(self.settings.host, self._port, shared=True))
            except OSError as exc:
                for sock in sockets:
                    sock.close()
                log.error("cannot listen on %s: %s", address(self.settings.host, self.settings.port), exc)
                return 3
            log.info("starting %d workers on %s", self.workers, address(self.settings.host, self._port))
            for index, sock in enumerate(sockets):
                self._start(index, sock)
            return self._supervise()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, sig: int, frame: object) -> None:
        # At once, not at the next turn of the loop: readiness must turn 503 before any worker
        # answers another probe. Workers always get SIGTERM: a second SIGINT would make uvicorn
        # drop what is in flight.
        self.board.shut_down()
        self._signal_all(signal.SIGTERM)
        self._signals.append(sig)

    def _start(self, index: int, sock: socket.socket, start_version: int | None = None) -> None:
        """Spawn worker `index` on its listening socket, which only the worker keeps."""
        if self.board.shutting_down:
            sock.close()
            return
        self.board.reset(index)
        try:
            process = self._context.Process(
                target=_worker_main,
                args=(self.settings, index, self.board, [sock], start_version, os.getpid()),
                name=f"digit-worker-{index + 1}",
            )
            process.start()
        finally:
            sock.close()  # the worker has its own copy now; the socket lives as long as the worker
        self._processes[index] = process
        self._served[index] = False
        if self.board.shutting_down and process.pid is not None:  # a signal came while it was starting
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)  # it alone: a second one would skip the others' delay

    def _serving_version(self) -> int | None:
        """The version the ready workers serve (the newest, should they differ); when none is ready,
        the last one seen served."""
        versions = [
            v
            for i in range(self.workers)
            if self.board.state(i) is WorkerState.READY and (v := self.board.version(i)) > 0
        ]
        if versions:
            self._last_version = max(versions)
        return self._last_version

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
                state = self.board.state(index)
                if process is not None and state is WorkerState.READY:
                    self._served[index] = self._has_served = True
                    self._failed_starts[index] = 0
                    self._serving_version()
                failed = process is not None and state is WorkerState.FAILED and self._served[index]
                if failed and stopping_since is None and process.is_alive():
                    log.error("worker %d reports failure (see its log); replacing it", index + 1)
                    process.kill()
                    process.join(timeout=5)
                if process is None or process.is_alive():
                    continue
                self._processes[index] = None
                self._mark_dead(process)
                if stopping_since is not None:
                    continue
                if not self._served[index]:
                    self._failed_starts[index] += 1
                if not self._has_served or self._failed_starts[index] >= MAX_FAILED_STARTS:
                    log.error(
                        "worker %d exited while starting (exit code %s, %d time(s) in a row); stopping the service",
                        index + 1,
                        process.exitcode,
                        self._failed_starts[index],
                    )
                    exit_code = 3
                    stopping_since = self._stop_all()
                    continue
                backoff_s = self._backoff_s(index)
                log.warning(
                    "worker %d died (exit code %s); starting a new one in %.0f s",
                    index + 1,
                    process.exitcode,
                    backoff_s,
                )
                self.board.reset(index)
                restarts[index] = time.monotonic() + backoff_s
            for index, when in list(restarts.items()):
                if stopping_since is None and time.monotonic() >= when:
                    del restarts[index]
                    try:
                        sock = bind_listener(self.settings.host, self._port, shared=True)
                    except OSError as exc:  # the port's other listeners changed under us: a failed start
                        self._failed_starts[index] += 1
                        log.error(
                            "cannot listen on %s for worker %d: %s",
                            address(self.settings.host, self._port),
                            index + 1,
                            exc,
                        )
                        if self._failed_starts[index] >= MAX_FAILED_STARTS:
                            log.error(
                                "worker %d failed %d starts in a row; stopping the service",
                                index + 1,
                                MAX_FAILED_STARTS,
                            )
                            exit_code = 3
                            stopping_since = self._stop_all()
                        else:
                            restarts[index] = time.monotonic() + self._backoff_s(index)
                        continue
                    self._start(index, sock, start_version=self._serving_version())
            sentinels = [p.sentinel for p in self._processes if p is not None]
            wait(sentinels, timeout=0.25) if sentinels else time.sleep(0.25)
        for process in self._processes:
            if process is not None:
                process.join(timeout=5)
                self._mark_dead(process)
        log.info("all workers stopped")
        return exit_code

    def _backoff_s(self, index: int) -> float:
        """How long slot `index` waits before its next start: doubling with each failed start in a row."""
        return min(MAX_BACKOFF_S, RESTART_BACKOFF_S * 2 ** self._failed_starts[index])

    def _stop_all(self) -> float:
        """Give up: no more starts, every worker told to drain. Returns when the stop began."""
        stopping_since = time.monotonic()
        self.board.shut_down()
        self._signal_all(signal.SIGTERM)
        return stopping_since

    def _signal_all(self, sig: int) -> None:
        # Also called from the signal handler: no waitpid here (is_alive would reap children
        # behind the main loop's back); a worker that has just exited is simply not found.
        for process in self._processes:
            if process is not None and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    @staticmethod
    def _mark_dead(process: BaseProcess) -> None:
        """Drop a dead worker's live gauges (in flight, queue depth, event-loop lag, model) from /metrics."""
        from prometheus_client import multiprocess

        if process.pid is not None:
            multiprocess.mark_process_dead(process.pid)
