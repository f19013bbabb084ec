"""The batcher on its own, with gated models: a test opens the gate when it is ready, so what it
asserts never depends on how fast this machine happens to be."""

import asyncio
import threading
import time

import pytest
import torch

from service.batcher import Batcher
from service.errors import InferenceTimeout, ModelFailure, Overloaded, ServiceUnavailable

WAIT = 10.0  # seconds any step may take before the test fails: generous, never reached when things work


class GatedModel:
    """Logits whose argmax is each image's first pixel x 10 (+ `shift`); records every batch.
    While `gate` is closed, a forward pass blocks, so tests can hold a batch on the worker thread."""

    def __init__(self, *, shift: int = 0, fail_when: float | None = None, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.shift = shift
        self.fail_when = fail_when
        self.delay_s = delay_s
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a forward pass has started

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(images))
        self.entered.set()
        if not self.gate.wait(WAIT):
            raise RuntimeError("gate never opened")
        if self.delay_s:
            time.sleep(self.delay_s)
        codes = images[:, 0, 0, 0]
        if self.fail_when is not None and bool((codes == self.fail_when).any()):
            raise RuntimeError("boom")
        digits = ((codes * 10).round().long() + self.shift) % 10
        return torch.nn.functional.one_hot(digits, 10).float()

    async def running(self) -> None:
        """Wait until a forward pass is on the worker thread."""
        assert await asyncio.to_thread(self.entered.wait, WAIT)
        self.entered.clear()


def images(*codes: float) -> torch.Tensor:
    x = torch.zeros(len(codes), 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor(codes)
    return x


def digits(result) -> list[int]:
    return result.rows.argmax(dim=1).tolist()


class Observer:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.rejections: list[str] = []
        self.errors = 0
        self.depths: list[int] = []
        self.waits: list[float] = []

    def batch_done(self, size: int, inference_s: float) -> None:
        self.batches.append(size)

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def queue_depth(self, images: int) -> None:
        self.depths.append(images)

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)

    def model_error(self) -> None:
        self.errors += 1


async def started(expected_rate: float = 0.0, **options) -> Batcher:
    batcher = Batcher(**options)
    await batcher.start()
    if expected_rate:
        batcher.expect_rate(expected_rate)  # as the app does when a model is installed
    return batcher


async def within(awaitable):
    return await asyncio.wait_for(awaitable, WAIT)


async def test_concurrent_requests_share_one_full_batch_without_waiting_out_the_wait() -> None:
    model = GatedModel()
    batcher = await started(max_batch_size=4, max_batch_wait_s=60.0)  # a full batch must not wait 60 s
    results = await within(asyncio.gather(*(batcher.submit(images(c), model, 5) for c in (0.1, 0.2, 0.3, 0.4))))
    await batcher.stop()
    assert model.batches == [4]
    assert [digits(r) for r in results] == [[1], [2], [3], [4]]
    assert all(r.batch_size == 4 for r in results)
    assert model.threads == {"inference_0"}  # never on the event loop's thread


async def test_partial_batch_runs_once_the_wait_expires() -> None:
    model = GatedModel()
    batcher = await started(max_batch_size=8, max_batch_wait_s=0.05)
    started_at = time.monotonic()
    results = await within(asyncio.gather(batcher.submit(images(0.3), model, 5), batcher.submit(images(0.5), model, 5)))
    elapsed = time.monotonic() - started_at
    await batcher.stop()
    assert model.batches == [2]
    assert [digits(r) for r in results] == [[3], [5]]
    assert elapsed >= 0.05  # it did wait for company (a lower bound: safe on a slow machine)


async def test_lone_request_does_not_wait_when_nobody_else_is_coming() -> None:
    model = GatedModel()
    batcher = await started(max_batch_size=8, max_batch_wait_s=60.0, on_the_way=lambda: 0)
    result = await within(batcher.submit(images(0.7), model, 5))  # would take 60 s if it waited
    await batcher.stop()
    assert digits(result) == [7]


async def test_a_large_request_is_split_across_batches_in_order() -> None:
    model = GatedModel()
    batcher = await started(max_batch_size=4, max_batch_wait_s=0.001)
    result = await within(batcher.submit(images(*[i / 10 for i in range(10)]), model, 5))
    await batcher.stop()
    assert model.batches == [4, 4, 2]
    assert digits(result) == list(range(10))
    assert result.batch_size == 4


async def test_requests_share_batches_with_a_split_request() -> None:
    model = GatedModel()
    model.gate.clear()
    batcher = await started(max_batch_size=4, max_batch_wait_s=0.0, on_the_way=lambda: 0)
    big = asyncio.create_task(batcher.submit(images(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), model, 5))
    await model.running()  # the first 4 images are on the worker thread, 2 are queued
    small = asyncio.create_task(batcher.submit(images(0.9), model, 5))
    await asyncio.sleep(0.01)
    model.gate.set()
    big_result, small_result = await within(asyncio.gather(big, small))
    await batcher.stop()
    assert digits(big_result) == [1, 2, 3, 4, 5, 6]
    assert digits(small_result) == [9]
    assert model.batches == [4, 3]  # the small request rode along with the big one's rest


async def test_batches_never_mix_models_and_each_request_is_computed_by_its_own() -> None:
    old, new = GatedModel(shift=0), GatedModel(shift=5)
    old.gate.clear()
    batcher = await started(max_batch_size=8, max_batch_wait_s=0.0, on_the_way=lambda: 0)
    first = asyncio.create_task(batcher.submit(images(0.1), old, 5))
    await old.running()
    queued = [asyncio.create_task(batcher.submit(images(0.2), m, 5)) for m in (old, new, old, new)]
    await asyncio.sleep(0.01)
    old.gate.set()
    results = await within(asyncio.gather(first, *queued))
    await batcher.stop()
    assert [digits(r) for r in results] == [[1], [2], [7], [2], [7]]  # new adds 5 to every answer
    assert old.batches == [1, 2] and new.batches == [2]  # never one batch for two models


async def test_model_error_reaches_every_caller_of_that_batch_and_the_batcher_survives() -> None:
    model = GatedModel(fail_when=0.9)
    observer = Observer()
    batcher = await started(max_batch_size=2, max_batch_wait_s=5.0, observer=observer, on_the_way=lambda: 0)
    outcomes = await within(
        asyncio.gather(
            batcher.submit(images(0.1), model, 5), batcher.submit(images(0.9), model, 5), return_exceptions=True
        )
    )
    assert model.batches == [2]
    assert all(isinstance(o, ModelFailure) for o in outcomes)
    assert "RuntimeError" in str(outcomes[0])
    assert observer.errors == 1
    after = await within(batcher.submit(images(0.2), model, 5))  # the next request succeeds
    await batcher.stop()
    assert digits(after) == [2]


async def test_a_caller_cancelled_while_queued_withdraws_only_its_own_images() -> None:
    model = GatedModel()
    model.gate.clear()
    batcher = await started(max_batch_size=4, max_batch_wait_s=0.0, on_the_way=lambda: 0)
    first = asyncio.create_task(batcher.submit(images(0.1), model, 5))
    await model.running()  # occupies the worker; the next two queue behind it
    doomed = asyncio.create_task(batcher.submit(images(0.2, 0.2), model, 5))
    survivor = asyncio.create_task(batcher.submit(images(0.3), model, 5))
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 3
    doomed.cancel()  # the client disconnected while queued
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.queue_depth == 1  # its two images left the queue at once
    model.gate.set()
    assert digits(await within(survivor)) == [3]
    assert digits(await within(first)) == [1]
    await batcher.stop()
    assert model.batches == [1, 1]  # the cancelled request's images never ran


async def test_a_caller_cancelled_while_its_batch_runs_leaves_the_others_intact() -> None:
    model = GatedModel()
    model.gate.clear()
    batcher = await started(max_batch_size=2, max_batch_wait_s=5.0)
    doomed = asyncio.create_task(batcher.submit(images(0.4), model, 5))
    survivor = asyncio.create_task(batcher.submit(images(0.6), model, 5))
    await model.running()
    assert model.batches == [2]  # both are in the running batch
    doomed.cancel()
    model.gate.set()
    assert digits(await within(survivor)) == [6]
    assert doomed.cancelled()
    await batcher.stop()


async def test_full_queue_rejects_without_waiting_with_retry_after() -> None:
    model = GatedModel()
    model.gate.clear()
    observer = Observer()
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0, queue_limit=2, observer=observer)
    running = asyncio.create_task(batcher.submit(images(0.1), model, 5))
    await model.running()
    queued = asyncio.create_task(batcher.submit(images(0.2, 0.3), model, 5))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as excinfo:
        await batcher.submit(images(0.4), model, 5)
    assert not model.gate.is_set()  # refused while the queue could not have moved: no waiting
    assert int(excinfo.value.headers["Retry-After"]) >= 1
    assert observer.rejections == ["queue_full"]
    model.gate.set()
    await within(asyncio.gather(running, queued))
    await batcher.stop()


async def test_a_request_that_waits_too_long_times_out_and_leaves_the_queue() -> None:
    model = GatedModel()
    model.gate.clear()
    observer = Observer()
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0, observer=observer)
    running = asyncio.create_task(batcher.submit(images(0.1), model, 5))
    await model.running()
    with pytest.raises(InferenceTimeout, match=r"no result within the request.s deadline of 0\.05 s"):
        await batcher.submit(images(0.2, 0.3), model, 0.05)
    assert batcher.queue_depth == 0
    assert observer.rejections == ["timeout"]
    model.gate.set()
    await within(running)
    await batcher.stop()
    assert model.batches == [1]


async def test_stop_finishes_queued_work_then_refuses_new_work() -> None:
    model = GatedModel()
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0)
    pending = [asyncio.create_task(batcher.submit(images(c), model, 5)) for c in (0.1, 0.2, 0.3)]
    await asyncio.sleep(0)
    await batcher.stop()
    assert [digits(t.result()) for t in pending] == [[1], [2], [3]]
    assert not batcher.running
    with pytest.raises(ServiceUnavailable):
        await batcher.submit(images(0.1), model, 5)


async def test_stop_gives_up_on_a_stuck_queue_after_the_drain_timeout() -> None:
    model = GatedModel()
    model.gate.clear()
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0)
    pending = [asyncio.create_task(batcher.submit(images(0.1), model, 5)) for _ in range(5)]
    await model.running()  # the first is stuck on the worker thread, four are queued
    await within(batcher.stop(drain_timeout_s=0.05))
    assert not model.gate.is_set()  # stop returned while the forward pass was still stuck
    outcomes = await within(asyncio.gather(*pending, return_exceptions=True))
    assert all(isinstance(o, ServiceUnavailable) for o in outcomes), outcomes  # the running one too
    model.gate.set()


async def test_queue_depth_is_right_after_a_model_error() -> None:
    observer = Observer()
    batcher = await started(max_batch_size=4, max_batch_wait_s=0.0, observer=observer)
    with pytest.raises(ModelFailure):
        await within(batcher.submit(images(*([0.9] * 10)), GatedModel(fail_when=0.9), 5))
    assert batcher.queue_depth == 0
    assert observer.depths[-1] == 0
    await batcher.stop()


async def test_a_dead_collector_fails_its_callers_at_once_and_says_why() -> None:
    model = GatedModel()
    model.gate.clear()
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0)
    running = asyncio.create_task(batcher.submit(images(0.1), model, 5))
    await model.running()
    queued = asyncio.create_task(batcher.submit(images(0.2), model, 60))

    def boom() -> list:
        raise RuntimeError("collector bug")

    batcher._take_batch = boom  # simulate a bug in the collector itself
    model.gate.set()
    with pytest.raises(ServiceUnavailable, match="stopped unexpectedly"):
        await within(queued)  # failed now, not after its 60 s deadline
    assert not batcher.running
    assert isinstance(batcher.failure, RuntimeError)
    assert digits(await within(running)) == [1]  # the batch already on the worker thread completed
    await batcher.stop()


async def test_an_output_without_one_row_per_image_is_a_model_error() -> None:
    batcher = await started(max_batch_size=2, max_batch_wait_s=0.0)
    with pytest.raises(ModelFailure):
        await within(batcher.submit(images(0.1), lambda x: torch.zeros(len(x) + 1, 10), 5))
    with pytest.raises(ModelFailure):
        await within(batcher.submit(images(0.1), lambda x: torch.tensor(0.0), 5))
    assert digits(await within(batcher.submit(images(0.3), GatedModel(), 5))) == [3]  # and it goes on
    await batcher.stop()


async def test_observer_sees_batches_depth_and_waits() -> None:
    observer = Observer()
    batcher = await started(max_batch_size=2, max_batch_wait_s=5.0, observer=observer)
    model = GatedModel()
    await within(asyncio.gather(*(batcher.submit(images(0.1), model, 5) for _ in range(3))))
    await batcher.stop()
    assert sorted(observer.batches) == [1, 2]
    assert max(observer.depths) >= 2
    assert observer.depths[-1] == 0
    assert len(observer.waits) == 3


async def test_a_request_that_would_miss_its_deadline_is_refused_at_once() -> None:
    model = GatedModel(delay_s=0.05)  # at most 20 images/s at batch 1 (fewer on a slow machine)
    observer = Observer()
    batcher = await started(
        max_batch_size=1, max_batch_wait_s=0.0, max_queue_delay_s=60.0, observer=observer, on_the_way=lambda: 0
    )
    await within(batcher.submit(images(0.1), model, 5))  # measures the throughput
    model.gate.clear()
    backlog = [asyncio.create_task(batcher.submit(images(0.2), model, 5)) for _ in range(6)]
    await model.running()
    assert batcher.expected_wait_s(1) > 0.2  # 5 queued + 1 at <= 20/s
    with pytest.raises(Overloaded, match="expected wait"):
        await batcher.submit(images(0.3), model, 0.2)
    assert not model.gate.is_set()  # refused while nothing could move: not after 0.2 s in the queue
    assert observer.rejections == ["deadline"]
    model.gate.set()
    await within(asyncio.gather(*backlog))
    assert digits(await within(batcher.submit(images(0.4), model, 0.2))) == [4]  # an empty queue admits it again
    await batcher.stop()


async def test_a_fresh_batcher_judges_its_queue_at_the_warm_up_rate_before_any_pass_is_timed() -> None:
    """A replacement worker joining a flood must not admit everything until its first pass ends."""
    model = GatedModel()
    model.gate.clear()
    observer = Observer()
    batcher = await started(
        expected_rate=20.0,  # images/s, as if measured at warm-up
        max_batch_size=1,
        max_batch_wait_s=0.0,
        max_queue_delay_s=0.05,
        observer=observer,
        on_the_way=lambda: 0,
    )
    running = asyncio.create_task(batcher.submit(images(0.1), model, 5))
    await model.running()  # the first pass has not ended: nothing is measured yet
    queued = asyncio.create_task(batcher.submit(images(0.2, 0.2), model, 5))  # 100 ms of work at 20/s
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match=r"requests wait 100 ms \(target 50 ms\)"):
        await batcher.submit(images(0.3), model, 5)
    assert observer.rejections == ["queue_delay"]
    model.gate.set()
    await within(asyncio.gather(running, queued))
    await batcher.stop()


async def test_the_first_timed_busy_pass_replaces_the_warm_up_rate_outright() -> None:
    """Warm-up times the model alone; beside the event loop's work it is slower. Averaged with the warm-up's
    figure, the measured rate would take dozens of passes to show, and the queue would be judged short."""
    model = GatedModel(delay_s=0.05)  # at most 20 images/s at batch 1
    batcher = await started(
        expected_rate=10_000.0, max_batch_size=1, max_batch_wait_s=0.0, max_queue_delay_s=0.05, on_the_way=lambda: 0
    )
    await within(batcher.submit(images(0.1), model, 5))  # a full pass: busy
    assert batcher.expected_wait_s(1) >= 0.04  # about 1/20 s; blended with 10,000/s it would be near 0
    model.gate.clear()
    running = asyncio.create_task(batcher.submit(images(0.2), model, 5))
    await model.running()
    queued = asyncio.create_task(batcher.submit(images(0.3, 0.3), model, 5))  # about 100 ms at the measured rate
    await asyncio.sleep(0.01)
    assert batcher.queue_delay_s() > 0.05  # judged at what was measured, not at the warm-up's 10,000/s
    with pytest.raises(Overloaded, match="requests wait"):
        await batcher.submit(images(0.4), model, 5)
    model.gate.set()
    await within(asyncio.gather(running, queued))
    await batcher.stop()


async def test_one_slow_small_pass_does_not_have_a_quiet_service_refuse_requests() -> None:
    """A lone request's pass that happens to be slow (the first on a fresh thread, a neighbour's burst) says
    little about the model's throughput; the warm-up's figure stands until a busy pass is timed."""
    model = GatedModel(delay_s=0.1)  # this pass: 10 images/s
    batcher = await started(
        expected_rate=10_000.0, max_batch_size=64, max_batch_wait_s=0.0, max_queue_delay_s=0.05, on_the_way=lambda: 0
    )
    await within(batcher.submit(images(0.1), model, 5))  # 1 image of 64: not a busy pass
    model.delay_s = 0.0
    model.gate.clear()
    running = asyncio.create_task(batcher.submit(images(0.2), model, 5))
    await model.running()
    queued = [asyncio.create_task(batcher.submit(images(0.3), model, 5)) for _ in range(7)]  # 8 clients' worth
    await asyncio.sleep(0.01)
    # At 10 images/s the 7 queued would be 700 ms: refused for the queue delay, and for a 0.5 s deadline.
    batcher.admit(1, 0.5)
    model.gate.set()
    await within(asyncio.gather(running, *queued))
    await batcher.stop()


async def test_a_new_model_is_judged_at_its_own_warm_up_rate_not_by_the_old_ones_passes() -> None:
    old, new = GatedModel(), GatedModel()
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0, max_queue_delay_s=0.05, on_the_way=lambda: 0)
    await within(batcher.submit(images(0.1), old, 5))  # a fast model: thousands of images/s measured
    old.gate.clear()
    in_flight = asyncio.create_task(batcher.submit(images(0.2), old, 5))
    await old.running()
    batcher.expect_rate(20.0, new)  # a reload installs a model that warmed up at 20 images/s
    old.gate.set()
    await within(in_flight)  # the old model's last pass ends after the switch: it says nothing of the new one
    assert batcher.expected_wait_s(2) == pytest.approx(0.1)
    await within(batcher.submit(images(0.3), new, 5))  # the new model's own first pass replaces the figure
    assert batcher.expected_wait_s(2) < 0.05
    await batcher.stop()


async def test_admission_is_by_queue_delay_not_image_count() -> None:
    model = GatedModel(delay_s=0.05)  # at most 20 images/s at batch 1 (fewer on a slow machine)
    observer = Observer()
    batcher = await started(
        max_batch_size=1, max_batch_wait_s=0.0, max_queue_delay_s=0.05, observer=observer, on_the_way=lambda: 0
    )
    # Into an empty queue even a large request is admitted: its own images are service time, not queueing.
    big = await within(batcher.submit(images(*([0.1] * 4)), model, 5))
    assert digits(big) == [1] * 4
    model.gate.clear()
    running = asyncio.create_task(batcher.submit(images(0.2), model, 5))
    await model.running()
    queued = asyncio.create_task(batcher.submit(images(0.3, 0.3), model, 5))  # 2 images: >= 100 ms of work
    await asyncio.sleep(0.01)
    assert batcher.queue_delay_s() > 0.05
    with pytest.raises(Overloaded, match=r"requests wait \d+ ms \(target 50 ms\)") as excinfo:
        await batcher.submit(images(0.4), model, 5)  # far from the queue limit, but it would wait too long
    assert not model.gate.is_set()  # refused at once, while nothing could move
    assert int(excinfo.value.headers["Retry-After"]) >= 1
    assert observer.rejections == ["queue_delay"]
    model.gate.set()
    await within(asyncio.gather(running, queued))
    assert batcher.queue_delay_s() == 0.0
    assert digits(await within(batcher.submit(images(0.5), model, 5))) == [5]  # drained: admitted again
    await batcher.stop()


async def test_models_interleaved_in_the_queue_still_run_in_full_batches() -> None:
    old, new = GatedModel(shift=0), GatedModel(shift=5)
    old.gate.clear()
    batcher = await started(max_batch_size=8, max_batch_wait_s=0.0, on_the_way=lambda: 0)
    first = asyncio.create_task(batcher.submit(images(0.1), old, 5))
    await old.running()
    # Around a hot reload, requests for the old and the new model arrive interleaved.
    queued = [asyncio.create_task(batcher.submit(images(0.2), m, 5)) for m in [old, new] * 8]
    await asyncio.sleep(0.01)
    old.gate.set()
    results = await within(asyncio.gather(first, *queued))
    await batcher.stop()
    assert [digits(r) for r in results[1:]] == [[2], [7]] * 8
    assert old.batches == [1, 8] and new.batches == [8]  # not 16 fragments of one image


async def test_a_cancelled_collector_is_reported_as_gone() -> None:
    batcher = await started(max_batch_size=1, max_batch_wait_s=0.0)
    assert not batcher.collector_gone
    batcher._task.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert batcher.collector_gone
    await batcher.stop()
    assert not batcher.collector_gone  # stopped on purpose: not a failure


async def test_requests_queued_by_the_event_loop_after_a_pass_ride_in_the_next_batch_together() -> None:
    """A busy event loop queues the requests that arrived during a forward pass over a few rounds
    (reading, decoding): the next batch waits those rounds out instead of running the first alone."""
    model = GatedModel()
    batcher = await started(max_batch_size=8, max_batch_wait_s=0.0)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(images(0.1), model, WAIT))
    await model.running()
    waiting = asyncio.create_task(batcher.submit(images(0.2), model, WAIT))  # queued during the pass

    async def arrives_after_the_pass(code: float, rounds: int):
        await first  # like a client's next request, sent once the first one is answered
        for _ in range(rounds):  # the event loop's work on it before it is queued
            await asyncio.sleep(0)
        return await batcher.submit(images(code), model, WAIT)

    later = [asyncio.create_task(arrives_after_the_pass(code, rounds)) for code, rounds in ((0.3, 1), (0.4, 3))]
    model.gate.set()
    results = await within(asyncio.gather(first, waiting, *later))
    assert [digits(result) for result in results] == [[1], [2], [3], [4]]
    assert model.batches == [1, 3]
    await batcher.stop()


async def test_on_an_idle_loop_the_next_batch_follows_a_pass_at_once() -> None:
    """The rounds given to arrivals after a pass cost nothing when nobody else is on the loop: a request
    queued during a pass runs right after it, not after the 5 s batching wait or anything like it."""
    model = GatedModel()
    batcher = await started(max_batch_size=8, max_batch_wait_s=5.0, on_the_way=lambda: 0)  # nobody else coming
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(images(0.1), model, WAIT))
    await model.running()
    second = asyncio.create_task(batcher.submit(images(0.2), model, WAIT))
    await asyncio.sleep(0)  # queued while the first pass runs
    released = time.monotonic()
    model.gate.set()
    assert [digits(result) for result in await within(asyncio.gather(first, second))] == [[1], [2]]
    assert model.batches == [1, 1]
    assert time.monotonic() - released < 1.0
    await batcher.stop()
