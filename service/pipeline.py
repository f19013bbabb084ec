"""The one path from decoded inputs to calibrated predictions, shared by /v1 and /v2.

    decode (the API's codec) -> preprocess (shared) -> predict (batcher) -> postprocess (shared) -> encode (codec)

The codecs turn HTTP bodies into `Prepared` inputs (28x28 arrays, or why there is no digit)
with the shared preprocessing, and `Outcome`s back into bodies. Everything between is here:
admission, decoding work moved off the event loop when it is big, batching on the model the
request resolved (whose predictor calibrates each batch with its own temperature), and the
digits and confidences per input. This module knows nothing of HTTP headers or routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from service.batcher import Batcher
from service.errors import ServiceUnavailable
from service.loop_lag import LoopLag
from service.metrics import Metrics
from service.predictor import Predictor
from service.preprocessing import NoDigit, Prepared


class Decoded(Protocol):
    """What a codec's decode step produces: the model inputs and the client's own deadline."""

    @property
    def inputs(self) -> list[Prepared]: ...

    @property
    def timeout_s(self) -> float | None: ...


D = TypeVar("D", bound=Decoded)


@dataclass(frozen=True)
class Timing:
    queue_s: float  # longest an image of the request waited for a batch
    preprocess_s: float  # decoding and preprocessing
    inference_s: float  # forward passes the request took part in
    batch_size: int  # the largest batch it took part in (0: nothing needed the model)


@dataclass(frozen=True)
class Outcome:
    """Predictions for every input of one request, all computed by `model`."""

    model: Predictor
    logits: np.ndarray  # [k, 10] float32; zeros where there is no digit
    probabilities: np.ndarray  # [k, 10] float32, calibrated with the model's temperature; zeros where no digit
    digits: np.ndarray  # [k] int64; -1 where there is no digit
    confidences: np.ndarray  # [k] float32; 0 where there is no digit
    no_digit: list[str | None]  # why input i holds no digit, or None
    inputs: list[np.ndarray | None]  # the 28x28 each input became (None where there is no digit)
    timing: Timing


class Pipeline:
    def __init__(
        self,
        batcher: Batcher,
        metrics: Metrics,
        *,
        request_timeout_s: float,
        decode_workers: int = 2,
    ) -> None:
        self._batcher = batcher
        self._metrics = metrics
        self._request_timeout_s = request_timeout_s
        # Big bodies and images are decoded here, off the event loop; few workers bound the
        # memory that many large uploads at once could take.
        self._decoder = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
        self._decoding = 0  # requests between a read body and their submission to the batcher
        self.loop_lag = LoopLag(report=metrics.event_loop_lag.set)  # measured by a task the app's lifespan runs

    @property
    def on_the_way(self) -> int:
        """Requests that will reach the batcher within a moment (for its batching wait): their body is
        read and they are being decoded. Slow uploads and requests already answered do not count."""
        return self._decoding

    def deadline(self, timeout_s: float | None) -> float:
        """The client's deadline, never longer than the server's request timeout."""
        return self._request_timeout_s if timeout_s is None else min(timeout_s, self._request_timeout_s)

    def admit(self, timeout_s: float | None = None) -> None:
        """Refuse now, before a body is read, what the batcher would refuse anyway (503, 429). The
        wait counted includes the event loop's lag: under CPU overload requests wait there first."""
        self._batcher.admit(1, self.deadline(timeout_s), waiting_s=self.loop_lag.seconds)

    async def run(self, model: Predictor, decode: Callable[[], D], *, offload: bool) -> tuple[D, Outcome]:
        """Decode (on a worker thread when `offload`), preprocess, predict with `model` (calibrated)."""
        self._decoding += 1
        submitted = False
        try:
            started = time.perf_counter()
            if offload:
                try:
                    future = asyncio.get_running_loop().run_in_executor(self._decoder, decode)
                except RuntimeError:  # the decoders were shut down: the service is stopping
                    raise ServiceUnavailable("the service is shutting down", headers={"Retry-After": "1"}) from None
                decoded = await future
            else:
                decoded = decode()
            preprocess_s = time.perf_counter() - started
            images = [item for item in decoded.inputs if not isinstance(item, NoDigit)]
            if not images:
                return decoded, self._postprocess(model, decoded.inputs, None, Timing(0.0, preprocess_s, 0.0, 0))
            batch = torch.from_numpy(np.stack(images)).unsqueeze(1)
            self._decoding -= 1  # from here on the batcher counts it as queued
            submitted = True
            result = await self._batcher.submit(batch, model, self.deadline(decoded.timeout_s))
        finally:
            if not submitted:
                self._decoding -= 1
        timing = Timing(result.queue_s, preprocess_s, result.inference_s, result.batch_size)
        return decoded, self._postprocess(model, decoded.inputs, result.rows, timing)

    def _postprocess(
        self, model: Predictor, inputs: list[Prepared], rows: torch.Tensor | None, timing: Timing
    ) -> Outcome:
        """The model's rows (logits, and probabilities calibrated with its own temperature: see
        `Predictor.__call__`) per input; inputs with no digit get -1 and zero rows."""
        no_digit = [item.reason if isinstance(item, NoDigit) else None for item in inputs]
        seen = [None if isinstance(item, NoDigit) else item for item in inputs]
        if rows is None:
            count = len(inputs)
            zeros = np.zeros((count, 10), dtype=np.float32)
            return Outcome(model, zeros, zeros, np.full(count, -1), np.zeros(count, np.float32), no_digit, seen, timing)
        both = rows.numpy()
        raw, calibrated = both[:, 0], both[:, 1]
        chosen = calibrated.argmax(axis=1)
        best = calibrated[np.arange(len(chosen)), chosen]
        self._metrics.predicted_many(chosen.tolist(), best.tolist())
        if len(raw) < len(inputs):  # some inputs had no digit: spread the rows out, zeros between
            rows = [i for i, reason in enumerate(no_digit) if reason is None]
            raw, calibrated, chosen, best = (
                _spread(raw, rows, len(inputs), 0.0),
                _spread(calibrated, rows, len(inputs), 0.0),
                _spread(chosen, rows, len(inputs), -1),
                _spread(best, rows, len(inputs), 0.0),
            )
        return Outcome(model, raw, calibrated, chosen.astype(np.int64, copy=False), best, no_digit, seen, timing)

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)


def _spread(values: np.ndarray, rows: list[int], count: int, fill: float) -> np.ndarray:
    out = np.full((count, *values.shape[1:]), fill, dtype=values.dtype)
    out[rows] = values
    return out
