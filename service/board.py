"""What the worker processes of one service tell each other, in shared memory.

Each worker owns one slot: its state (starting, ready, draining, failed), the model version it
serves and a heartbeat. Any worker can then answer the probes for all of them, since a load
balancer's probe reaches whichever worker accepts it: ready only when every worker is, live only
while none has failed or hung. A shared counter asks every worker to look for a new model version,
so one admin reload (or one worker's watcher) switches them all.

A single-process service has a board of one slot, so the code path is the same.
"""

from __future__ import annotations

import enum
import multiprocessing
import time
from ctypes import Array

# A ready worker that has not published for this long is hung (its event loop is blocked).
STALE_AFTER_S = 15.0
PUBLISH_EVERY_S = 0.25


class WorkerState(enum.IntEnum):
    STARTING = 0
    READY = 1
    DRAINING = 2
    FAILED = 3
    STOPPED = 4


class WorkerBoard:
    """Shared slots for `workers` processes; pass it to each worker at spawn."""

    def __init__(self, workers: int, context: multiprocessing.context.BaseContext | None = None) -> None:
        if workers < 1:
            raise ValueError("a board needs at least one worker")
        ctx = context or multiprocessing.get_context("spawn")
        self.size = workers
        # Each slot has one writer, and a torn read of a slot is harmless, so no locks there: a
        # worker killed while holding a shared lock would freeze every other worker's probes.
        self._state: Array = ctx.RawArray("i", workers)
        self._version: Array = ctx.RawArray("i", workers)
        self._beat: Array = ctx.RawArray("d", workers)
        self._shutting_down: Array = ctx.RawArray("i", 1)  # written by the supervisor only
        # Many writers, but a lost increment is harmless (any change means "look now"): no lock either.
        self._reloads: Array = ctx.RawArray("i", 1)
        for index in range(workers):
            self.reset(index)

    # --- a worker's own slot -----------------------------------------------------------------

    def publish(self, index: int, state: WorkerState, version: int) -> None:
        self._version[index] = version  # before the state: READY is never seen with a stale version
        self._beat[index] = time.monotonic()  # CLOCK_MONOTONIC is one clock for the whole machine
        self._state[index] = state

    def reset(self, index: int) -> None:
        """A (re)spawned worker starts afresh; the supervisor calls this before starting it."""
        self.publish(index, WorkerState.STARTING, 0)

    # --- everyone's ---------------------------------------------------------------------------

    def state(self, index: int) -> WorkerState:
        return WorkerState(self._state[index])

    def version(self, index: int) -> int:
        return self._version[index]

    def not_ready(self, *, besides: int) -> str | None:
        """Why some worker other than `besides` is not ready, or None."""
        for index in range(self.size):
            if index != besides and self.state(index) is not WorkerState.READY:
                return f"worker {index + 1} of {self.size} is {self.state(index).name.lower()}"
        return None

    def not_live(self, *, besides: int, now: float | None = None) -> str | None:
        """Why some worker other than `besides` cannot make progress, or None."""
        now = time.monotonic() if now is None else now
        for index in range(self.size):
            if index == besides:
                continue
            state = self.state(index)
            if state is WorkerState.FAILED:
                return f"worker {index + 1} of {self.size} has failed"
            silent = now - self._beat[index]
            if state is WorkerState.READY and silent > STALE_AFTER_S:
                return f"worker {index + 1} of {self.size} has not answered for {silent:.0f} s"
        return None

    def versions(self) -> list[int]:
        return [self.version(index) for index in range(self.size)]

    @property
    def shutting_down(self) -> bool:
        """The supervisor has been told to stop: every worker's readiness is off from this moment."""
        return bool(self._shutting_down[0])

    def shut_down(self) -> None:
        self._shutting_down[0] = 1

    # --- reloads ------------------------------------------------------------------------------

    @property
    def reload_requests(self) -> int:
        return self._reloads[0]

    def request_reload(self) -> None:
        """Ask every worker to look for a new model version now."""
        self._reloads[0] += 1
