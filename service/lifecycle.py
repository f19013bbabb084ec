"""Liveness and readiness, from what the service really is doing.

Ready: a verified, warmed model is installed, the batcher runs, and no shutdown has begun.
Draining (after SIGTERM) turns readiness off at once so load balancers stop sending, while
requests that still arrive are served until the listener closes. Live: the process can make
progress; a batcher whose collector died cannot, so liveness fails and the orchestrator
restarts the process instead of leaving it up but never ready again.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.batcher import Batcher
from service.model_registry import ModelRegistry


@dataclass
class Lifecycle:
    registry: ModelRegistry
    batcher: Batcher
    draining: bool = False  # a shutdown has begun

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        if self.draining:
            return "shutting down"
        if self.registry.model is None:
            return "the model is not loaded yet"
        if not self.batcher.running:
            return "the batcher is not running"
        return None

    def liveness(self) -> str | None:
        """None when live, else why not."""
        if self.batcher.failure is not None:
            return f"the batcher's collector died: {type(self.batcher.failure).__name__}: {self.batcher.failure}"
        if self.batcher.collector_gone:
            return "the batcher's collector has stopped"
        return None
