import asyncio
import threading
import time

import pytest
import torch

from service.batcher import Batcher
from service.errors import InferenceTimeout, ModelFailure, Overloaded, ServiceUnavailable


class RecordingModel:
    """Logits whose argmax is each image's first pixel x 10; records every batch size."""

    def __init__(self, delay_s: float = 0.0, fail_when: float | None = None) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.fail_when = fail_when
        self.threads: set[str] = set()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(images))
        if self.delay_s:
            time.sleep(self.delay_s)
        codes = images[:, 0, 0, 0]
        if self.fail_when is not None and bool((codes == self.fail_when).any()):
            raise RuntimeError("boom")
        return torch.nn.functional.one_hot((codes * 10).round().long().clamp(0, 9), 10).float()


def images(*codes: float) -> torch.Tensor:
    x = torch.zeros(len(codes), 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor(codes)
    return x


def digits(result) -> list[int]:
    return result.logits.argmax(dim=1).tolist()


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


async def started(batcher: Batcher) -> Batcher:
    await batcher.start()
    return batcher


async def test_concurrent_requests_share_one_full_batch() -> None:
    model = RecordingModel()
    batcher = await started(Batcher(model, max_batch_size=4, max_batch_wait_s=1.0))
    results = await asyncio.gather(*(batcher.submit(images(c), 5) for c in (0.1, 0.2, 0.3, 0.4)))
    await batcher.stop()
    assert model.batches == [4]  # full batch: ran without waiting out the 1 s
    assert [digits(r) for r in results] == [[1], [2], [3], [4]]
    assert all(r.batch_size == 4 for r in results)
    assert model.threads == {"inference_0"}  # never on the event loop's thread


async def test_partial_batch_runs_when_the_wait_expires() -> None:
    model = RecordingModel()
    batcher = await started(Batcher(model, max_batch_size=8, max_batch_wait_s=0.02))
    started_at = time.monotonic()
    results = await asyncio.gather(batcher.submit(images(0.3), 5), batcher.submit(images(0.5), 5))
    elapsed = time.monotonic() - started_at
    await batcher.stop()
    assert model.batches == [2]
    assert [digits(r) for r in results] == [[3], [5]]
    assert 0.015 <= elapsed < 1.0


async def test_lone_request_does_not_wait_when_nobody_else_is_coming() -> None:
    model = RecordingModel()
    batcher = await started(Batcher(model, max_batch_size=8, max_batch_wait_s=5.0, on_the_way=lambda: 0))
    started_at = time.monotonic()
    result = await batcher.submit(images(0.7), 5)
    await batcher.stop()
    assert digits(result) == [7]
    assert time.monotonic() - started_at < 1.0


async def test_a_large_request_is_split_across_batches_in_order() -> None:
    model = RecordingModel()
    batcher = await started(Batcher(model, max_batch_size=4, max_batch_wait_s=0.001))
    codes = [i / 10 for i in range(10)]
    result = await batcher.submit(images(*codes), 5)
    await batcher.stop()
    assert model.batches == [4, 4, 2]
    assert digits(result) == list(range(10))
    assert result.batch_size == 4


async def test_requests_share_batches_with_a_split_request() -> None:
    model = RecordingModel(delay_s=0.01)
    batcher = await started(Batcher(model, max_batch_size=4, max_batch_wait_s=0.005))
    big = asyncio.create_task(batcher.submit(images(0.1, 0.2, 0.3, 0.4, 0.5, 0.6), 5))
    await asyncio.sleep(0)
    small = asyncio.create_task(batcher.submit(images(0.9), 5))
    big_result, small_result = await asyncio.gather(big, small)
    await batcher.stop()
    assert digits(big_result) == [1, 2, 3, 4, 5, 6]
    assert digits(small_result) == [9]
    assert model.batches == [4, 3]  # the small request rode along in the second batch


async def test_model_error_reaches_every_caller_of_that_batch_and_the_batcher_survives() -> None:
    model = RecordingModel(fail_when=0.9)
    observer = Observer()
    batcher = await started(Batcher(model, max_batch_size=4, max_batch_wait_s=0.05, observer=observer))
    outcomes = await asyncio.gather(
        batcher.submit(images(0.1), 5), batcher.submit(images(0.9), 5), return_exceptions=True
    )
    assert all(isinstance(o, ModelFailure) for o in outcomes)
    assert "RuntimeError" in str(outcomes[0])
    assert observer.errors == 1
    after = await batcher.submit(images(0.2), 5)  # the next request succeeds
    await batcher.stop()
    assert digits(after) == [2]


async def test_a_cancelled_caller_does_not_break_the_others_in_its_batch() -> None:
    model = RecordingModel(delay_s=0.05)
    batcher = await started(Batcher(model, max_batch_size=4, max_batch_wait_s=0.0))
    first = asyncio.create_task(batcher.submit(images(0.1), 5))  # occupies the worker
    await asyncio.sleep(0.01)
    doomed = asyncio.create_task(batcher.submit(images(0.2, 0.2), 5))
    survivor = asyncio.create_task(batcher.submit(images(0.3), 5))
    await asyncio.sleep(0)
    doomed.cancel()  # the client disconnected while queued
    assert digits(await survivor) == [3]
    assert digits(await first) == [1]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.queue_depth == 0
    await batcher.stop()
    assert model.batches == [1, 1]  # the cancelled request's images never ran


async def test_cancelled_while_running_leaves_the_rest_of_the_batch_intact() -> None:
    model = RecordingModel(delay_s=0.05)
    batcher = await started(Batcher(model, max_batch_size=4, max_batch_wait_s=0.02))
    doomed = asyncio.create_task(batcher.submit(images(0.4), 5))
    survivor = asyncio.create_task(batcher.submit(images(0.6), 5))
    await asyncio.sleep(0.04)  # both are in the running batch now
    doomed.cancel()
    assert digits(await survivor) == [6]
    await batcher.stop()


async def test_full_queue_rejects_at_once_with_retry_after() -> None:
    model = RecordingModel(delay_s=0.1)
    observer = Observer()
    batcher = await started(Batcher(model, max_batch_size=1, max_batch_wait_s=0.0, queue_limit=2, observer=observer))
    running = asyncio.create_task(batcher.submit(images(0.1), 5))
    await asyncio.sleep(0.02)  # now running; the queue is empty
    queued = asyncio.create_task(batcher.submit(images(0.2, 0.3), 5))
    await asyncio.sleep(0)
    started_at = time.monotonic()
    with pytest.raises(Overloaded) as excinfo:
        await batcher.submit(images(0.4), 5)
    assert time.monotonic() - started_at < 0.05
    assert int(excinfo.value.headers["Retry-After"]) >= 1
    assert observer.rejections == ["queue_full"]
    await asyncio.gather(running, queued)
    await batcher.stop()


async def test_a_request_that_waits_too_long_times_out_and_leaves_the_queue() -> None:
    model = RecordingModel(delay_s=0.2)
    observer = Observer()
    batcher = await started(Batcher(model, max_batch_size=1, max_batch_wait_s=0.0, observer=observer))
    running = asyncio.create_task(batcher.submit(images(0.1), 5))
    await asyncio.sleep(0.01)
    with pytest.raises(InferenceTimeout, match=r"no result within the request.s deadline of 0\.05 s"):
        await batcher.submit(images(0.2, 0.3), 0.05)
    assert batcher.queue_depth == 0
    assert observer.rejections == ["timeout"]
    await running
    await batcher.stop()
    assert model.batches == [1]


async def test_stop_finishes_queued_work_then_refuses_new_work() -> None:
    model = RecordingModel(delay_s=0.02)
    batcher = await started(Batcher(model, max_batch_size=1, max_batch_wait_s=0.0))
    pending = [asyncio.create_task(batcher.submit(images(c), 5)) for c in (0.1, 0.2, 0.3)]
    await asyncio.sleep(0)
    await batcher.stop()
    assert [digits(t.result()) for t in pending] == [[1], [2], [3]]
    assert not batcher.running
    with pytest.raises(ServiceUnavailable):
        await batcher.submit(images(0.1), 5)


async def test_stop_gives_up_on_a_stuck_queue_after_the_drain_timeout() -> None:
    model = RecordingModel(delay_s=0.5)
    batcher = await started(Batcher(model, max_batch_size=1, max_batch_wait_s=0.0))
    pending = [asyncio.create_task(batcher.submit(images(0.1), 5)) for _ in range(5)]
    await asyncio.sleep(0.05)  # the first is on the worker thread, four are queued
    started_at = time.monotonic()
    await batcher.stop(drain_timeout_s=0.05)
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(o, ServiceUnavailable) for o in outcomes), outcomes  # the running one too
    assert time.monotonic() - started_at < 0.3  # neither waits for the stuck forward pass


async def test_queue_depth_is_right_after_a_model_error() -> None:
    observer = Observer()
    batcher = await started(
        Batcher(RecordingModel(fail_when=0.9), max_batch_size=4, max_batch_wait_s=0.0, observer=observer)
    )
    with pytest.raises(ModelFailure):
        await batcher.submit(images(*([0.9] * 10)), 5)
    assert batcher.queue_depth == 0
    assert observer.depths[-1] == 0
    await batcher.stop()


async def test_a_dead_collector_fails_its_callers_at_once() -> None:
    batcher = await started(Batcher(RecordingModel(delay_s=0.1), max_batch_size=1, max_batch_wait_s=0.0))
    running = asyncio.create_task(batcher.submit(images(0.1), 5))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(batcher.submit(images(0.2), 5))
    await asyncio.sleep(0)

    def boom() -> list:
        raise RuntimeError("collector bug")

    batcher._take_batch = boom  # simulate a bug in the collector itself
    started_at = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="stopped unexpectedly"):
        await queued
    assert time.monotonic() - started_at < 1.0
    assert not batcher.running
    await running  # the batch already on the worker thread still completes
    await batcher.stop()


async def test_wrong_output_shape_is_a_model_error() -> None:
    batcher = await started(Batcher(lambda x: torch.zeros(len(x), 3), max_batch_size=2, max_batch_wait_s=0.0))
    with pytest.raises(ModelFailure):
        await batcher.submit(images(0.1), 5)
    await batcher.stop()


async def test_observer_sees_batches_depth_and_waits() -> None:
    observer = Observer()
    batcher = await started(Batcher(RecordingModel(), max_batch_size=2, max_batch_wait_s=0.01, observer=observer))
    await asyncio.gather(*(batcher.submit(images(0.1), 5) for _ in range(3)))
    await batcher.stop()
    assert sorted(observer.batches) == [1, 2]
    assert max(observer.depths) >= 2
    assert observer.depths[-1] == 0
    assert len(observer.waits) == 3


async def test_a_request_that_would_miss_its_deadline_is_refused_at_once() -> None:
    model = RecordingModel(delay_s=0.05)  # 20 images/s at batch 1
    observer = Observer()
    batcher = await started(Batcher(model, max_batch_size=1, max_batch_wait_s=0.0, observer=observer))
    await batcher.submit(images(0.1), 5)  # measures the throughput
    backlog = [asyncio.create_task(batcher.submit(images(0.2), 5)) for _ in range(6)]
    await asyncio.sleep(0)
    assert batcher.expected_wait_s(1) > 0.2
    started_at = time.monotonic()
    with pytest.raises(Overloaded, match="expected wait"):
        await batcher.submit(images(0.3), 0.2)
    assert time.monotonic() - started_at < 0.05  # refused now, not after 0.2 s in the queue
    assert observer.rejections == ["deadline"]
    await asyncio.gather(*backlog)
    assert digits(await batcher.submit(images(0.4), 0.2)) == [4]  # an empty queue admits it again
    await batcher.stop()
