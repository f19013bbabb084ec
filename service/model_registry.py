"""The model that new requests get.

A request resolves its model once, here, and carries that object through admission,
batching, postprocessing and rendering: nothing downstream asks again, so one answer is
computed, labelled and calibrated by one and the same version even while a hot reload
installs another.
"""

from __future__ import annotations

from collections.abc import Callable

from service.errors import ServiceUnavailable
from service.predictor import Predictor


class ModelRegistry:
    def __init__(self, on_install: Callable[[Predictor], None] | None = None) -> None:
        self._model: Predictor | None = None
        self._on_install = on_install

    @property
    def model(self) -> Predictor | None:
        """The installed model, or None before the first one is loaded."""
        return self._model

    def current(self) -> Predictor:
        """The model for a new request; 503 until one is installed."""
        model = self._model
        if model is None:
            raise ServiceUnavailable("not ready: the model is not loaded yet", headers={"Retry-After": "1"})
        return model

    def install(self, model: Predictor) -> Predictor | None:
        """Serve new requests with `model`; requests that resolved the old one finish on it.
        Returns the previous model."""
        previous, self._model = self._model, model
        if self._on_install is not None:
            self._on_install(model)
        return previous
