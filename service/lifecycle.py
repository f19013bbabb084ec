"""Liveness and readiness, from what the service really is doing.

Ready: a verified, warmed model is installed, the batcher runs, the socket listens, and no
shutdown has begun, in this worker and in every other worker of the service (they share a
`WorkerBoard`). Draining (after SIGTERM) turns readiness off at once so load balancers stop
sending, while requests that still arrive are served until the listener closes. Live: the process can make progress; a
batcher whose collector died cannot, so liveness fails and the orchestrator restarts the
service instead of leaving it up but never ready again. A worker that fails or hangs fails
liveness for the whole service the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.batcher import Batcher
from service.board import WorkerBoard, WorkerState
from service.model_registry import ModelRegistry


@dataclass
class Lifecycle:
    registry: ModelRegistry
    batcher: Batcher
    board: WorkerBoard = field(default_factory=lambda: WorkerBoard(1))
    index: int = 0  # this worker's slot on the board
    draining: bool = False  # a shutdown has begun
    # The worker's socket takes connections. The server clears this until its socket listens (after the
    # model is ready and the heap frozen); an app under a test client has no socket to wait for.
    listening: bool = True

    def own_readiness(self) -> str | None:
        if self.draining or self.board.shutting_down:
            return "shutting down"
        if self.registry.model is None:
            return "the model is not loaded yet"
        if not self.batcher.running:
            return "the batcher is not running"
        if not self.listening:
            return "the socket is not listening yet"
        return None

    def own_liveness(self) -> str | None:
        if self.batcher.failure is not None:
            return f"the batcher's collector died: {type(self.batcher.failure).__name__}: {self.batcher.failure}"
        if self.batcher.collector_gone:
            return "the batcher's collector has stopped"
        return None

    def readiness(self) -> str | None:
        """None when the whole service is ready, else why not."""
        return self.own_readiness() or self.board.not_ready(besides=self.index)

    def liveness(self) -> str | None:
        """None when every worker can make progress, else why not."""
        return self.own_liveness() or self.board.not_live(besides=self.index)

    def publish(self) -> None:
        """Put this worker's state on the board for the others' probes."""
        if self.own_liveness() is not None:
            state = WorkerState.FAILED
        elif self.draining:
            state = WorkerState.DRAINING
        elif self.own_readiness() is None:
            state = WorkerState.READY
        else:
            state = WorkerState.STARTING
        model = self.registry.model
        self.board.publish(self.index, state, model.version if model is not None else 0)
