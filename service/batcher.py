"""Dynamic batching: coalesce concurrent requests' images into one forward pass.

Callers `submit` a tensor of k images together with the model that must compute them, and
await their k rows of its output. The batcher knows nothing of HTTP or of which model is
"current": the caller resolved its model once and carries it here. One collector task
gathers queued images into batches of at most `max_batch_size`, waiting at most
`max_batch_wait_s` for a batch to fill, and runs the model on one dedicated worker thread
so the event loop never blocks on torch. A request's images may span several batches and
share them with other requests of the same model; batches never mix models, so work queued
before a hot reload finishes on the model it was submitted with. Every request owns its
future: a caller that times out or is cancelled only withdraws its own images, and a model
error fails only that batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from service.errors import InferenceTimeout, ModelFailure, Overloaded, ServiceUnavailable

log = logging.getLogger(__name__)

LET_IN_ROUNDS = 16  # at most this many event-loop rounds between a pass and the next batch (_let_arrivals_in)
LET_IN_MAX_S = 0.010  # ... and at most this long

InferFn = Callable[[torch.Tensor], torch.Tensor]  # [B, 1, 28, 28] float32 -> [B, ...]: a row per image


class BatchObserver(Protocol):
    """What the batcher reports; the metrics module implements it."""

    def batch_done(self, size: int, inference_s: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def model_error(self) -> None: ...


@dataclass(frozen=True)
class BatchResult:
    rows: torch.Tensor  # [k, ...]: the model's output for the request's images, CPU
    queue_s: float  # longest time one of its images waited for a batch
    inference_s: float  # forward-pass time of the batches it took part in
    batch_size: int  # the largest batch it took part in


@dataclass(eq=False)
class _Pending:
    images: torch.Tensor
    future: asyncio.Future[BatchResult]
    enqueued_at: float
    infer: InferFn  # the model the caller resolved
    rows: torch.Tensor | None = None  # its rows of the batch's output; a buffer when it spans batches
    next_index: int = 0  # first image not yet taken into a batch
    done_images: int = 0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0

    @property
    def untaken(self) -> int:
        return len(self.images) - self.next_index


@dataclass(frozen=True)
class _Piece:
    request: _Pending
    start: int
    stop: int


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int = 64,
        max_batch_wait_s: float = 0.002,
        queue_limit: int = 2048,
        max_queue_delay_s: float = 0.075,  # the service's default target (DIGIT_MAX_QUEUE_DELAY_MS)
        observer: BatchObserver | None = None,
        on_the_way: Callable[[], int] | None = None,
    ) -> None:
        """`on_the_way()` counts requests about to be submitted (their bodies are being decoded); when
        it is zero there is nobody to wait for, so a lone request runs at once."""
        if max_batch_size < 1 or queue_limit < 1 or max_batch_wait_s < 0 or max_queue_delay_s <= 0:
            raise ValueError(
                "max_batch_size and queue_limit must be >= 1, max_batch_wait_s >= 0, max_queue_delay_s > 0"
            )
        self.max_batch_size = max_batch_size
        self.max_batch_wait_s = max_batch_wait_s
        self.queue_limit = queue_limit
        self.max_queue_delay_s = max_queue_delay_s
        self.let_in_rounds = LET_IN_ROUNDS
        self._observer = observer
        self.on_the_way = on_the_way or (lambda: 1)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._running: list[_Piece] = []  # the batch on the worker thread right now
        self._recent_rate = 0.0  # images per second over passes of any size, smoothed (see _rate)
        self.failure: BaseException | None = None  # why the collector died, if it did
        # Images/s of recent batches at least half full: what the model does when it is busy. The
        # queue's delay is judged at this rate; a rate measured on the small batches of a quiet
        # period would under-rate the model and refuse work it could easily do.
        self._busy_rate = 0.0
        # Whether a pass (a busy one) has been timed since the rates were last unknown or assumed
        # (expect_rate); the first timed pass sets them outright.
        self._timed = self._timed_busy = False
        self._rated_model: InferFn | None = None  # whose passes are timed; None: every model's

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def collector_gone(self) -> bool:
        """The collector ended (died or was cancelled) while nobody asked the batcher to stop."""
        return self._task is not None and self._task.done() and not self._stopping

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return self._queued_images

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.create_task(self._run(), name="batcher")
        self._task.add_done_callback(self._collector_done)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new work, finish what is queued (up to the timeout), then shut down."""
        if self._task is None:
            return
        self._stopping = True
        self._arrived.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise  # stop() itself was cancelled
        except Exception:  # noqa: BLE001, S110 - the collector died; _collector_done logged it
            pass
        shutting_down = ServiceUnavailable("the service is shutting down")
        for piece in self._running:  # a batch still on the worker thread when the drain ran out
            self._fail(piece.request, shutting_down)
        self._running = []
        self._fail_queued(shutting_down)
        if self._executor is not None:
            # Don't block the event loop on a forward pass that may still be running.
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- submitting ----------------------------------------------------------------------

    def admit(self, count: int, timeout_s: float, *, waiting_s: float = 0.0) -> None:
        """Raise the answer `count` more images would get: 503 when not serving; 429 when the queue
        is full, when queued work already waits longer than the target queue delay, or when they
        could not be done within their deadline. Called with 1 before a body is read, so shedding load
        costs almost nothing; submit() checks again with the real count.

        The target is a delay, not an image count (as in CoDel): the queue may hold what the model gets
        through in `max_queue_delay_s` at its measured busy throughput, so latency stays bounded under
        overload whatever the model's speed, and the model still runs full batches. A request's own
        images are service time, not queueing: a large request into an empty queue is admitted.
        `waiting_s` is wait that new requests see before the queue (the event loop's lag)."""
        if self._stopping or self._task is None or self._task.done():
            self._report_rejected("unavailable")
            raise ServiceUnavailable(
                "the model is not serving right now; try again shortly", headers={"Retry-After": "1"}
            )
        if self._queued_images + count > self.queue_limit:
            self._report_rejected("queue_full")
            raise Overloaded(
                f"server busy: {self._queued_images} images queued (limit {self.queue_limit}); retry later",
                headers={"Retry-After": str(self._retry_after_s())},
            )
        delay_s = self.queue_delay_s() + waiting_s
        if delay_s > self.max_queue_delay_s:
            self._report_rejected("queue_delay")
            raise Overloaded(
                f"server busy: requests wait {delay_s * 1000:.0f} ms (target {self.max_queue_delay_s * 1000:.0f} ms); "
                "retry later",
                headers={"Retry-After": str(self._retry_after_s())},
            )
        expected_wait_s = self.expected_wait_s(count)
        if expected_wait_s > timeout_s:
            # It would only time out in the queue: say so now, while the client can still retry elsewhere.
            self._report_rejected("deadline")
            raise Overloaded(
                f"server busy: the expected wait ({expected_wait_s:.3g} s) exceeds this request's "
                f"deadline ({timeout_s:.3g} s); retry later",
                headers={"Retry-After": str(self._retry_after_s())},
            )

    async def submit(self, images: torch.Tensor, model: InferFn, timeout_s: float) -> BatchResult:
        """Queue `images` [k, 1, 28, 28] for `model` and wait for their rows of its output."""
        count = len(images)
        if count == 0:
            raise ValueError("no images to submit")
        self.admit(count, timeout_s)
        loop = asyncio.get_running_loop()
        request = _Pending(images=images, future=loop.create_future(), enqueued_at=time.monotonic(), infer=model)
        self._queue.append(request)
        self._queued_images += count
        self._report_depth()
        self._arrived.set()
        try:
            # A timeout or a cancellation cancels the request's own future: the collector skips it.
            async with asyncio.timeout(timeout_s):
                return await request.future
        except TimeoutError:
            self._withdraw(request)
            self._report_rejected("timeout")
            raise InferenceTimeout(
                f"no result within the request's deadline of {timeout_s:.3g} s; retry later"
            ) from None
        except asyncio.CancelledError:
            self._withdraw(request)  # the client went away; its images leave the queue
            raise

    def expect_rate(self, images_per_s: float, model: InferFn | None = None) -> None:
        """Assume `images_per_s` (a model's rate at full batches, measured when it was warmed up) until
        passes are timed: as the busy rate until a busy pass (at least half full) is timed, as the recent
        rate until any pass is. Without it a fresh worker admits everything that arrives before its first
        pass ends, and after a reload the old model's speed would judge the new one's queue. Warm-up times
        the model alone, without the event loop's work beside it, so the first timed pass replaces the
        figure outright rather than being averaged with it. Small passes do not replace the busy figure:
        one slow pass at low load (the first on a fresh thread, say) would otherwise have the queue of a
        quiet service judged at a few images/s, and refuse its next requests. Given the `model`, only its
        passes are timed from now on: after a reload, the old model's last passes say nothing of the new."""
        self._busy_rate = self._recent_rate = max(images_per_s, 0.0)
        self._timed = self._timed_busy = False
        self._rated_model = model

    def queue_delay_s(self) -> float:
        """How long the images queued now take to get through the model, at its busy throughput."""
        return self.expected_wait_s()

    def expected_wait_s(self, extra_images: int = 0) -> float:
        """How long new images would wait behind the queue; 0 while no rate is known."""
        rate = self._rate()
        return (self._queued_images + extra_images) / rate if rate > 0 else 0.0

    def _rate(self) -> float:
        """Images/s to judge the queue by: the busy rate, unless recent passes were faster still. The
        recent rate alone would let one slow small pass (the first on a fresh thread) refuse a quiet
        worker's requests for missing deadlines they would easily meet."""
        return max(self._busy_rate, self._recent_rate)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        """If the collector ever dies, fail its callers now rather than at their timeouts."""
        if task.cancelled() or task.exception() is None:
            return
        self.failure = task.exception()
        log.error("the batcher's collector died; failing queued requests", exc_info=self.failure)
        self._fail_queued(ServiceUnavailable("the batcher stopped unexpectedly; try again shortly"))

    def _withdraw(self, request: _Pending) -> None:
        if request.untaken:
            self._queued_images -= request.untaken
            request.next_index = len(request.images)
            self._report_depth()
        if not request.future.done():
            request.future.cancel()

    # --- the collector -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        just_ran = False
        while True:
            if not self._queued_images:
                if self._stopping:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                just_ran = False
                continue
            if not just_ran:  # the model was idle: give concurrent requests a moment to join
                await self._wait_for_company()
            else:
                await self._let_arrivals_in()
            pieces = self._take_batch()
            if not pieces:
                continue
            await self._run_batch(loop, pieces)
            just_ran = True

    async def _wait_for_company(self) -> None:
        deadline = time.monotonic() + self.max_batch_wait_s
        while self._queued_images < self.max_batch_size and not self._stopping:
            if self.on_the_way() <= 0:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _let_arrivals_in(self) -> None:
        """After a forward pass, give the event loop a few rounds before the next batch is taken:
        requests that arrived meanwhile are read, decoded and queued in them, and ride in that batch
        rather than in a small one of their own after it. At most `let_in_rounds` rounds and
        LET_IN_MAX_S (a 2 ms bound gave up most of the gain, measured): an idle loop goes through
        them in microseconds, a busy one spends each round on a request. A pass costs the model
        about 0.9 ms of overhead on a CPU whatever its size, and there the event loop shares the
        cores, so bigger batches are throughput for everyone (measured with 64 clients on 2 cores:
        mean batch 17 -> 30 images, about 10 % more answers per second, p99 no worse). On a GPU the
        forward pass overlaps the event loop's work instead; the app sets no rounds there."""
        deadline = time.monotonic() + LET_IN_MAX_S
        for _ in range(self.let_in_rounds):
            if self._queued_images >= self.max_batch_size or self._stopping or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0)

    def _take_batch(self) -> list[_Piece]:
        """The next batch: the oldest request's model, and as many of that model's queued images as fit.
        Requests for another model (queued around a hot reload) wait for the next batch, so models
        interleaved in the queue still run in full batches rather than in fragments."""
        pieces: list[_Piece] = []
        room = self.max_batch_size
        now = time.monotonic()
        model: InferFn | None = None
        for request in self._queue:
            if not room:
                break
            if request.untaken == 0 or request.future.done():
                continue  # finished, withdrawn or failed
            if model is None:
                model = request.infer
            elif request.infer is not model:
                continue  # a batch runs on one model
            start = request.next_index
            stop = start + min(room, request.untaken)
            pieces.append(_Piece(request, start, stop))
            request.next_index = stop
            request.queue_s = max(request.queue_s, now - request.enqueued_at)
            self._queued_images -= stop - start
            room -= stop - start
        while self._queue and (self._queue[0].untaken == 0 or self._queue[0].future.done()):
            self._queue.popleft()
        if len(self._queue) > 2 * self.max_batch_size:  # rarely: drop finished requests stuck behind others
            self._queue = collections.deque(r for r in self._queue if r.untaken and not r.future.done())
        self._report_depth()
        if self._observer is not None:
            for piece in pieces:
                if piece.start == 0:
                    self._observer.queue_wait(now - piece.request.enqueued_at)
        return pieces

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, pieces: list[_Piece]) -> None:
        parts = [piece.request.images[piece.start : piece.stop] for piece in pieces]
        size = sum(len(part) for part in parts)
        started = time.monotonic()
        self._running = pieces
        model = pieces[0].request.infer
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward, model, parts)
            if outputs.ndim < 1 or len(outputs) != size:
                raise RuntimeError(f"model returned shape {tuple(outputs.shape)} for a batch of {size}")
            if not bool(torch.isfinite(outputs).all()):
                raise RuntimeError("model returned non-finite outputs (NaN or infinity)")
        except Exception as exc:
            self._running = []
            log.exception("inference failed for a batch of %d images", size)
            if self._observer is not None:
                self._observer.model_error()
            failure = ModelFailure(f"the model failed on this batch: {type(exc).__name__}")
            for piece in pieces:
                self._fail(piece.request, failure)
            self._report_depth()  # failed requests' later images left the queue too
            return
        # (On cancellation by stop(), _running stays set so that stop() can fail those callers.)
        self._running = []
        elapsed = time.monotonic() - started
        if self._rated_model is None or model is self._rated_model:
            rate = size / max(elapsed, 1e-6)
            self._recent_rate = _smoothed(self._recent_rate, rate, first=not self._timed)
            self._timed = True
            if 2 * size >= self.max_batch_size:
                self._busy_rate = _smoothed(self._busy_rate, rate, first=not self._timed_busy)
                self._timed_busy = True
        if self._observer is not None:
            self._observer.batch_done(size, elapsed)
        offset = 0
        for piece in pieces:
            request, count = piece.request, piece.stop - piece.start
            rows = outputs[offset : offset + count]
            if count == len(request.images):
                request.rows = rows  # the common case, the whole request in one batch: no copy
            else:
                if request.rows is None:
                    request.rows = torch.empty((len(request.images), *outputs.shape[1:]), dtype=outputs.dtype)
                request.rows[piece.start : piece.stop] = rows
            offset += count
            request.done_images += count
            request.inference_s += elapsed
            request.batch_size = max(request.batch_size, size)
            if request.done_images == len(request.images) and not request.future.done():
                assert request.rows is not None
                request.future.set_result(
                    BatchResult(request.rows, request.queue_s, request.inference_s, request.batch_size)
                )

    @staticmethod
    def _forward(model: InferFn, parts: list[torch.Tensor]) -> torch.Tensor:
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        return model(batch)

    def _fail(self, request: _Pending, error: Exception) -> None:
        if request.untaken:
            self._queued_images -= request.untaken
            request.next_index = len(request.images)
        if not request.future.done():
            request.future.set_exception(error)

    def _fail_queued(self, error: Exception) -> None:
        while self._queue:
            self._fail(self._queue.popleft(), error)
        self._report_depth()

    # --- reporting -------------------------------------------------------------------------

    def _retry_after_s(self) -> int:
        return max(1, math.ceil(self.expected_wait_s()))

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self._queued_images)

    def _report_rejected(self, reason: str) -> None:
        if self._observer is not None:
            self._observer.rejected(reason)


def _smoothed(average: float, sample: float, *, first: bool) -> float:
    """A rate averaged over recent passes; the first timed pass replaces whatever was assumed before it."""
    return sample if first else 0.8 * average + 0.2 * sample
