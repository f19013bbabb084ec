"""What the routes share: settings, collaborators and readiness, kept on app.state."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from service.batcher import Batcher

if TYPE_CHECKING:
    from service.auth import TokenCheck
    from service.reload import Reloader
from service.config import Settings
from service.errors import ServiceUnavailable
from service.metrics import Metrics
from service.predictor import Predictor


@dataclass
class ServingState:
    settings: Settings
    metrics: Metrics
    api_auth: TokenCheck
    admin_auth: TokenCheck
    predictor: Predictor | None = None
    batcher: Batcher | None = None
    reloader: Reloader | None = None  # set when the model comes from artifacts (not injected)
    loaded: bool = False  # verified, warmed model in place
    shutting_down: bool = False
    predict_in_flight: int = 0  # prediction requests received and not yet answered
    # Decoding big images is memory-hungry: at most two at a time, on worker threads.
    big_image_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    @property
    def ready(self) -> bool:
        return self.loaded and not self.shutting_down and self.batcher is not None and self.batcher.running

    def serving(self) -> tuple[Predictor, Batcher]:
        """The model and batcher, or 503 when the service is not ready for predictions."""
        if not self.ready or self.predictor is None or self.batcher is None:
            detail = "shutting down" if self.shutting_down else "the model is not loaded yet"
            raise ServiceUnavailable(f"not ready: {detail}", headers={"Retry-After": "1"})
        return self.predictor, self.batcher

    def on_the_way(self) -> int:
        """Prediction requests received but not yet in the batcher (for the batcher's wait)."""
        active = self.batcher.active_requests if self.batcher is not None else 0
        return self.predict_in_flight - active


async def get_state(request: Request) -> ServingState:
    # async on purpose: FastAPI runs plain-def dependencies on a thread pool, a thread hop per request.
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_state)]
