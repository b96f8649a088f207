"""dramaturg.shared.batching: batches form, lengths group, overload and deadlines fail fast and cleanly.

Plain ``asyncio.run`` per test (no pytest-asyncio). Timing bounds are generous: CI has 2 slow cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from dramaturg.shared.batching import DynamicBatcher
from dramaturg.shared.grpc.errors import ServiceError, invalid_argument


class Recorder:
    """A sync ``process`` that remembers every batch it saw (runs in the batcher's worker thread)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[float]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, items: list[float]) -> list[float]:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.batches.append(list(items))
        return [x * 10 for x in items]

    @property
    def seen(self) -> list[float]:
        return [x for batch in self.batches for x in batch]


@contextlib.contextmanager
def releasing(gate: threading.Event) -> Iterator[None]:
    """Open ``gate`` however the block ends, so a failing assertion cannot leave a batch blocked."""
    try:
        yield
    finally:
        gate.set()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_concurrent_submits_form_batches() -> None:
    recorder = Recorder(delay=0.01)
    sizes: list[int] = []

    async def main() -> list[float]:
        batcher = DynamicBatcher(
            recorder, max_batch_size=8, max_wait_ms=20, on_batch=lambda n, s: sizes.append(n)
        )
        async with batcher:
            return await asyncio.gather(*(batcher.submit(float(i)) for i in range(40)))

    results = run(main())
    assert results == [i * 10.0 for i in range(40)]  # each caller gets its own result, in order
    assert sorted(recorder.seen) == [float(i) for i in range(40)]  # everything ran exactly once
    assert len(recorder.batches) < 40 / 2  # real batching, not one call per item
    assert all(1 <= len(b) <= 8 for b in recorder.batches)
    assert sizes == [len(b) for b in recorder.batches]


def test_async_process_function_is_awaited() -> None:
    calls: list[int] = []

    async def process(items: list[int]) -> list[int]:
        calls.append(len(items))
        await asyncio.sleep(0)
        return [-x for x in items]

    async def main() -> list[int]:
        async with DynamicBatcher(process, max_batch_size=4, max_wait_ms=10) as batcher:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert run(main()) == [-i for i in range(10)]
    assert max(calls) <= 4 and len(calls) < 10


def test_items_are_grouped_by_length() -> None:
    recorder = Recorder()
    # Interleave short (1 s) and long (30 s) items so arrival order alone would mix them.
    items = [1.0 + i * 0.01 if i % 2 == 0 else 30.0 + i * 0.01 for i in range(16)]

    async def main() -> None:
        async with DynamicBatcher(
            recorder, max_batch_size=8, max_wait_ms=50, length_of=lambda x: x
        ) as batcher:
            await asyncio.gather(*(batcher.submit(x) for x in items))

    run(main())
    assert sorted(recorder.seen) == sorted(items)
    for batch in recorder.batches:
        assert max(batch) - min(batch) < 5, f"short and long items mixed in one batch: {batch}"


def test_without_length_grouping_batches_are_fifo() -> None:
    recorder = Recorder()

    async def main() -> None:
        async with DynamicBatcher(recorder, max_batch_size=4, max_wait_ms=50) as batcher:
            await asyncio.gather(*(batcher.submit(float(i)) for i in range(8)))

    run(main())
    assert recorder.batches == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]


def test_max_batch_length_is_respected_and_long_items_run_alone() -> None:
    recorder = Recorder()
    items = [3.0, 4.0, 2.0, 5.0, 6.0, 1.0, 25.0, 2.5, 3.5, 4.5]

    async def main() -> None:
        batcher = DynamicBatcher(
            recorder, max_batch_size=16, max_wait_ms=50, length_of=lambda x: x, max_batch_length=10.0
        )
        async with batcher:
            await asyncio.gather(*(batcher.submit(x) for x in items))

    run(main())
    assert sorted(recorder.seen) == sorted(items)
    assert [25.0] in recorder.batches  # over the limit on its own: runs alone rather than never
    for batch in recorder.batches:
        if batch != [25.0]:
            assert sum(batch) <= 10.0, batch


def test_overload_is_resource_exhausted_with_a_retry_delay() -> None:
    started, gate = threading.Event(), threading.Event()

    def process(items: list[int]) -> list[int]:
        started.set()
        gate.wait(timeout=30)
        return list(items)

    async def main() -> None:
        batcher = DynamicBatcher(process, max_batch_size=2, max_wait_ms=1, max_queue=4)
        async with batcher:
            with releasing(gate):
                first = [asyncio.create_task(batcher.submit(i)) for i in range(2)]
                while not started.is_set():  # the first batch is running (and blocked)
                    await asyncio.sleep(0.005)
                queued = [asyncio.create_task(batcher.submit(i)) for i in range(2, 6)]
                await asyncio.sleep(0.05)
                assert batcher.queue_depth == 4
                with pytest.raises(ServiceError) as info:
                    await batcher.submit(99, deadline=time.monotonic() + 10)
                error = info.value
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error.retry_after_seconds is not None and error.retry_after_seconds > 0
                assert "full" in error.message and "4 waiting" in error.message
            assert await asyncio.gather(*first, *queued) == [0, 1, 2, 3, 4, 5]

    run(main())


def test_retry_delay_follows_throughput() -> None:
    async def main() -> float:
        async with DynamicBatcher(Recorder(delay=0.05), max_batch_size=1, max_wait_ms=0) as batcher:
            for i in range(3):
                await batcher.submit(float(i))
            return batcher.retry_after_seconds()

    # One item per 0.05 s (or slower on a busy machine): an empty queue clears in roughly that.
    assert 0.04 <= run(main()) < 5


def test_expired_items_get_deadline_exceeded_and_are_never_processed() -> None:
    gate = threading.Event()
    seen: list[str] = []

    def process(items: list[str]) -> list[str]:
        seen.extend(items)
        if "blocker" in items:
            gate.wait(timeout=30)
        return items

    async def main() -> None:
        async with DynamicBatcher(process, max_batch_size=1, max_wait_ms=1) as batcher:
            with releasing(gate):
                blocker = asyncio.create_task(batcher.submit("blocker"))
                while not seen:
                    await asyncio.sleep(0.005)
                late = asyncio.create_task(batcher.submit("late", deadline=time.monotonic() + 0.1))
                patient = asyncio.create_task(batcher.submit("patient", deadline=time.monotonic() + 30))
                with pytest.raises(ServiceError) as info:
                    await late
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "queue" in info.value.message
                gate.set()
                assert await blocker == "blocker"
                assert await patient == "patient"
                with pytest.raises(ServiceError) as info:  # already past: refused before queueing
                    await batcher.submit("past", deadline=time.monotonic() - 1)
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    run(main())
    assert "late" not in seen and "past" not in seen
    assert seen == ["blocker", "patient"]


def test_deadline_passing_while_the_batch_runs_leaves_the_batcher_healthy() -> None:
    gate = threading.Event()

    def process(items: list[str]) -> list[str]:
        if "slow" in items:
            gate.wait(timeout=30)
        return items

    async def main() -> None:
        async with DynamicBatcher(process, max_batch_size=1, max_wait_ms=1) as batcher:
            with releasing(gate):
                with pytest.raises(ServiceError) as info:
                    await batcher.submit("slow", deadline=time.monotonic() + 0.2)
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "while its batch was running" in info.value.message
            # The late result is dropped quietly and the next request is served.
            assert await batcher.submit("next", deadline=time.monotonic() + 30) == "next"

    run(main())


def test_cancelled_submit_is_never_processed() -> None:
    gate = threading.Event()
    seen: list[str] = []

    def process(items: list[str]) -> list[str]:
        seen.extend(items)
        if "blocker" in items:
            gate.wait(timeout=30)
        return items

    async def main() -> None:
        async with DynamicBatcher(process, max_batch_size=1, max_wait_ms=1) as batcher:
            with releasing(gate):
                blocker = asyncio.create_task(batcher.submit("blocker"))
                while not seen:
                    await asyncio.sleep(0.005)
                gone = asyncio.create_task(batcher.submit("gone"))
                kept = asyncio.create_task(batcher.submit("kept"))
                await asyncio.sleep(0.02)
                assert batcher.queue_depth == 2
                gone.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await gone
                assert batcher.queue_depth == 1  # withdrawn at once, not left to clog the queue
                gate.set()
                assert await blocker == "blocker"
                assert await kept == "kept"

    run(main())
    assert seen == ["blocker", "kept"]


def test_exceptions_reach_every_item_of_the_batch() -> None:
    def process(items: list[int]) -> list[int]:
        if 3 in items:
            raise invalid_argument("text", "item 3 is bad")
        if 13 in items:
            raise RuntimeError("CUDA out of memory")
        return items

    async def main() -> list[object]:
        async with DynamicBatcher(process, max_batch_size=4, max_wait_ms=50) as batcher:
            return await asyncio.gather(*(batcher.submit(i) for i in range(16)), return_exceptions=True)

    results = run(main())
    # FIFO batches: [0..3] fail with the ServiceError's own code, [12..15] with INTERNAL.
    for i in range(4):
        assert isinstance(results[i], ServiceError) and results[i].code == grpc.StatusCode.INVALID_ARGUMENT
        assert results[i].field_violations == [("text", "item 3 is bad")]
    assert results[4:12] == list(range(4, 12))
    for i in range(12, 16):
        assert isinstance(results[i], ServiceError) and results[i].code == grpc.StatusCode.INTERNAL
        assert "CUDA out of memory" in results[i].message
        assert isinstance(results[i].__cause__, RuntimeError)
    assert results[0] is not results[1]  # one exception object per waiter


def test_wrong_number_of_results_is_internal() -> None:
    async def main() -> list[object]:
        async with DynamicBatcher(lambda items: items[:-1], max_batch_size=4, max_wait_ms=20) as batcher:
            return await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)

    for result in run(main()):
        assert isinstance(result, ServiceError) and result.code == grpc.StatusCode.INTERNAL
        assert "3 results for a batch of 4" in result.message


def test_stop_with_drain_finishes_queued_work() -> None:
    recorder = Recorder(delay=0.02)

    async def main() -> list[float]:
        # The 7th item would wait 60 s for company; draining must run it at once.
        batcher = DynamicBatcher(recorder, max_batch_size=2, max_wait_ms=60_000)
        tasks = [asyncio.create_task(batcher.submit(float(i))) for i in range(7)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await batcher.stop(drain=True)
        assert time.monotonic() - started < 20
        assert batcher.queue_depth == 0
        with pytest.raises(ServiceError) as info:
            await batcher.submit(99.0)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        return await asyncio.gather(*tasks)

    assert run(main()) == [i * 10.0 for i in range(7)]
    assert sorted(recorder.seen) == [float(i) for i in range(7)]


def test_stop_without_drain_fails_queued_work_with_unavailable() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def process(items: list[int]) -> list[int]:
        seen.extend(items)
        gate.wait(timeout=30)
        return items

    async def main() -> list[object]:
        batcher = DynamicBatcher(process, max_batch_size=2, max_wait_ms=1)
        batcher.start()
        with releasing(gate):
            tasks = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
            while not seen:
                await asyncio.sleep(0.005)
            stopping = asyncio.create_task(batcher.stop(drain=False))
            await asyncio.sleep(0.05)
        # gate open: the running batch finishes; the queued ones must not start
        await stopping
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(main())
    assert results[:2] == [0, 1]
    for result in results[2:]:
        assert isinstance(result, ServiceError) and result.code == grpc.StatusCode.UNAVAILABLE
    assert seen == [0, 1]


def test_hooks_report_queue_depth_and_batches() -> None:
    depths: list[int] = []
    batches: list[tuple[int, float]] = []

    async def main() -> None:
        batcher = DynamicBatcher(
            Recorder(),
            max_batch_size=3,
            max_wait_ms=20,
            on_queue_depth=depths.append,
            on_batch=lambda n, s: batches.append((n, s)),
        )
        async with batcher:
            await asyncio.gather(*(batcher.submit(float(i)) for i in range(6)))

    run(main())
    assert max(depths) >= 3 and depths[-1] == 0
    assert sum(n for n, _ in batches) == 6 and all(s >= 0 for _, s in batches)


def test_a_failing_hook_does_not_break_batching() -> None:
    def broken(*_: object) -> None:
        raise ValueError("metrics backend down")

    async def main() -> list[float]:
        batcher = DynamicBatcher(Recorder(), max_wait_ms=5, on_batch=broken, on_queue_depth=broken)
        async with batcher:
            return await asyncio.gather(*(batcher.submit(float(i)) for i in range(3)))

    assert run(main()) == [0.0, 10.0, 20.0]


def test_sync_process_runs_off_the_event_loop() -> None:
    loop_thread: list[int] = []
    worker_threads: set[int] = set()

    def process(items: list[int]) -> list[int]:
        worker_threads.add(threading.get_ident())
        time.sleep(0.05)
        return items

    async def main() -> int:
        loop_thread.append(threading.get_ident())
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        async with DynamicBatcher(process, max_batch_size=1, max_wait_ms=0) as batcher:
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        tick_task.cancel()
        return ticks

    ticks = run(main())
    assert len(worker_threads) == 1 and loop_thread[0] not in worker_threads
    assert ticks >= 3  # the loop kept running while the worker slept


def test_a_given_executor_runs_the_batches_and_outlives_the_batcher() -> None:
    """A model service's model thread runs every batch (one OpenMP pool); stopping must not close it."""
    from concurrent.futures import ThreadPoolExecutor

    names: set[str] = set()

    def process(items: list[int]) -> list[int]:
        names.add(threading.current_thread().name)
        return items

    executor = ThreadPoolExecutor(1, thread_name_prefix="model-thread")
    try:
        async def main() -> None:
            async with DynamicBatcher(process, max_batch_size=2, max_wait_ms=0, executor=executor) as b:
                await asyncio.gather(*(b.submit(i) for i in range(5)))

        run(main())
        assert names and all(n.startswith("model-thread") for n in names), names
        assert executor.submit(lambda: 7).result(timeout=5) == 7  # still open after the batcher stopped
    finally:
        executor.shutdown()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_length=10.0)
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), max_batch_size=0)
