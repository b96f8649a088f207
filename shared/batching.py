"""A length-aware dynamic batcher: many concurrent requests in, one model call per batch out.

GPU models answer a batch of 16 in about the time of one request, so a service that runs requests
one by one wastes most of its accelerator. Requests arrive one RPC at a time, though, so something
must hold them for a few milliseconds, group them and fan the results back out. This does that, with
the guarantees a server needs:

* **Bounded queue.** Past ``max_queue`` waiting items a submit fails at once with
  ``RESOURCE_EXHAUSTED`` and a RetryInfo delay estimated from recent throughput, instead of letting
  latency grow without bound.
* **Deadlines and cancellation.** An item whose deadline passes while it waits is dropped (its caller
  gets ``DEADLINE_EXCEEDED``), and an item whose caller went away (task cancelled) is never run: the
  model does no work nobody will read.
* **Length-aware grouping.** Models pad a batch to its longest item; with ``length_of`` the batcher
  fills a batch with items of similar length (and at most ``max_batch_length`` in total, e.g.
  seconds of audio that fit in GPU memory), so short requests do not pay for long ones.
* **Fair.** Every batch is built around the oldest waiting item, so no item starves behind a stream
  of better-fitting ones.

One batch runs at a time. Synchronous ``process`` functions run in a single worker thread so the
event loop keeps accepting requests (and the model sees one caller, as most inference code expects).
Metrics plug in through the ``on_batch`` / ``on_queue_depth`` hooks so this module stays free of
Prometheus.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from types import TracebackType
from typing import Generic, Self, TypeVar

import grpc
from dramaturg.shared.grpc.errors import (
    ServiceError,
    deadline_exceeded,
    resource_exhausted,
    unavailable,
)

__all__ = ["DynamicBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Bounds on the RetryInfo delay a full queue answers: never "retry now" (that is a retry storm), and
# never so long that a client gives up on a server that recovers in seconds.
_MIN_RETRY_SECONDS = 0.05
_MAX_RETRY_SECONDS = 60.0
_DEFAULT_RETRY_SECONDS = 1.0  # before the first batch has finished there is no throughput to go on
_THROUGHPUT_WINDOW = 32  # batches remembered for the throughput estimate


@dataclasses.dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    length: float
    future: asyncio.Future[R]
    enqueued: float  # loop time
    deadline: float | None  # loop time
    seq: int


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted concurrently and runs ``process`` on batches of them.

    ``process`` receives a list of items and returns one result per item, in order; it may be a
    coroutine function or a plain function (run in a single worker thread when ``run_in_executor``).
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R]] | list[R]],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        length_of: Callable[[T], float] | None = None,
        max_batch_length: float | None = None,
        run_in_executor: bool = True,
        executor: Executor | None = None,
        name: str = "batcher",
        on_batch: Callable[[int, float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {max_queue}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be ≥ 0, got {max_wait_ms}")
        if max_batch_length is not None and length_of is None:
            raise ValueError("max_batch_length needs length_of to measure items")
        if max_batch_length is not None and max_batch_length <= 0:
            raise ValueError(f"max_batch_length must be positive, got {max_batch_length}")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.length_of = length_of
        self.max_batch_length = max_batch_length
        self.run_in_executor = run_in_executor
        self.name = name
        self.on_batch = on_batch
        self.on_queue_depth = on_queue_depth

        self._queue: list[_Pending[T, R]] = []  # in arrival order
        self._seq = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # A caller's executor (e.g. a model service's model threads) is used and never shut down here;
        # without one the batcher starts its own single worker thread.
        self._shared_executor = executor
        self._executor: Executor | None = executor
        self._stopping = False
        self._drain = True
        self._history: collections.deque[tuple[int, float]] = collections.deque(maxlen=_THROUGHPUT_WINDOW)

    # ------------------------------------------------------------------------------------------ API

    @property
    def queue_depth(self) -> int:
        """Items waiting to be batched (not counting the batch being processed)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the scheduler on the running event loop (``submit`` also starts it on first use)."""
        if self._stopping:
            raise RuntimeError(f"{self.name} was stopped; create a new batcher")
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-scheduler")

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting items; with ``drain`` finish everything queued, else fail it with UNAVAILABLE.

        The batch already running always finishes (a thread cannot be interrupted safely).
        """
        if self._stopping and not self.running:
            return
        self._stopping = True
        self._drain = self._drain and drain
        if not drain:
            self._fail_queued(unavailable(f"{self.name} is shutting down; retry on another replica"))
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._executor is not None and self._executor is not self._shared_executor:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Leaving on an error (or a cancellation) should not wait for a backlog nobody will read.
        await self.stop(drain=exc_type is None)

    async def submit(self, item: T, *, deadline: float | None = None) -> R:
        """Queue ``item`` and wait for its result.

        ``deadline`` is absolute ``time.monotonic()`` time (e.g. from the gRPC context's
        ``time_remaining()``). Raises RESOURCE_EXHAUSTED when the queue is full, DEADLINE_EXCEEDED
        when the deadline passes first, UNAVAILABLE once stopping, and whatever ``process`` raised.
        Cancelling the awaiting task withdraws the item.
        """
        if self._stopping:
            raise unavailable(f"{self.name} is shutting down; retry on another replica")
        if not self.running:
            self.start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        loop_deadline = None
        if deadline is not None:
            loop_deadline = now + (deadline - time.monotonic())
            if loop_deadline <= now:
                raise deadline_exceeded(f"{self.name}: the deadline passed before the request was queued")
        depth = len(self._queue)
        if depth >= self.max_queue:
            retry = self.retry_after_seconds()
            raise resource_exhausted(
                f"{self.name} queue is full ({depth} waiting); retry after {retry:.2f} s",
                retry_after_seconds=retry,
            )
        length = max(0.0, float(self.length_of(item))) if self.length_of is not None else 0.0
        pending: _Pending[T, R] = _Pending(
            item, length, loop.create_future(), now, loop_deadline, next(self._seq)
        )
        self._queue.append(pending)
        self._report_depth()
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            if loop_deadline is None:
                return await pending.future
            async with asyncio.timeout_at(loop_deadline):
                return await pending.future
        except TimeoutError:
            queued = self._withdraw(pending)
            where = "in the queue" if queued else "while its batch was running"
            raise deadline_exceeded(
                f"{self.name}: the deadline passed {where} after {loop.time() - now:.3f} s"
            ) from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def retry_after_seconds(self) -> float:
        """How long the current backlog should take to clear, from the last batches' throughput."""
        items = sum(n for n, _ in self._history)
        seconds = sum(s for _, s in self._history)
        if not items or seconds <= 0:
            estimate = _DEFAULT_RETRY_SECONDS
        else:
            estimate = (len(self._queue) + 1) * seconds / items
        return min(_MAX_RETRY_SECONDS, max(_MIN_RETRY_SECONDS, estimate))

    # ------------------------------------------------------------------------------------ internals

    def _report_depth(self) -> None:
        if self.on_queue_depth is not None:
            try:
                self.on_queue_depth(len(self._queue))
            except Exception:
                logger.exception("%s: on_queue_depth hook failed", self.name)

    def _withdraw(self, pending: _Pending[T, R]) -> bool:
        """Remove an item its caller gave up on; True if it was still queued (so it never runs)."""
        if not pending.future.done():
            pending.future.cancel()
        try:
            self._queue.remove(pending)
        except ValueError:
            return False
        self._report_depth()
        return True

    def _fail_queued(self, error: ServiceError) -> None:
        queued, self._queue = self._queue, []
        for pending in queued:
            if not pending.future.done():
                pending.future.set_exception(dataclasses.replace(error))
        if queued:
            self._report_depth()

    def _purge(self) -> None:
        """Drop items whose caller left and fail those whose deadline passed while they waited."""
        now = asyncio.get_running_loop().time()
        keep: list[_Pending[T, R]] = []
        for pending in self._queue:
            if pending.future.done():
                continue
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(
                    deadline_exceeded(
                        f"{self.name}: the deadline passed after {now - pending.enqueued:.3f} s in the queue"
                    )
                )
                continue
            keep.append(pending)
        if len(keep) != len(self._queue):
            self._queue = keep
            self._report_depth()

    def _is_full(self) -> bool:
        if len(self._queue) >= self.max_batch_size:
            return True
        if self.max_batch_length is not None:
            return sum(p.length for p in self._queue) >= self.max_batch_length
        return False

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Wait until a batch is due (full, or its oldest item waited max_wait); None once stopped."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            self._purge()
            if not self._queue:
                if self._stopping:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            waited = loop.time() - self._queue[0].enqueued
            if self._stopping or self._is_full() or waited >= self.max_wait:
                return self._take()
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.max_wait - waited):
                    await self._wakeup.wait()

    def _take(self) -> list[_Pending[T, R]]:
        """Remove one batch from the queue: the oldest item plus the items closest to it in length."""
        anchor = self._queue[0]
        if self.length_of is None:
            batch = self._queue[: self.max_batch_size]
        elif self.max_batch_length is not None and anchor.length >= self.max_batch_length:
            batch = [anchor]  # too long to share a batch: it runs alone rather than never
        else:
            others = sorted(self._queue[1:], key=lambda p: (abs(p.length - anchor.length), p.seq))
            batch, total = [anchor], anchor.length
            for pending in others:
                if len(batch) >= self.max_batch_size:
                    break
                if self.max_batch_length is not None and total + pending.length > self.max_batch_length:
                    continue
                batch.append(pending)
                total += pending.length
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        self._report_depth()
        return batch

    async def _call_process(self, items: list[T]) -> list[R]:
        if inspect.iscoroutinefunction(self.process) or not self.run_in_executor:
            result = self.process(items)
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, self.process, items)
        if inspect.isawaitable(result):
            result = await result
        return list(result)  # type: ignore[arg-type]

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        results: list[R] = []
        try:
            results = await self._call_process([p.item for p in batch])
            if len(results) != len(batch):
                error = ServiceError(
                    grpc.StatusCode.INTERNAL,
                    f"{self.name}: the model returned {len(results)} results for a batch of {len(batch)}",
                    reason="BATCH_RESULT_MISMATCH",
                )
                logger.error("%s", error.message)
        except ServiceError as exc:
            error = exc
        except asyncio.CancelledError:
            error = unavailable(f"{self.name} stopped while the batch was running")
            raise
        except Exception as exc:
            logger.exception("%s: processing a batch of %d failed", self.name, len(batch))
            error = ServiceError(
                grpc.StatusCode.INTERNAL,
                f"{self.name}: processing the batch failed: {type(exc).__name__}: {exc}",
                reason="BATCH_FAILED",
            )
            error.__cause__ = exc
        finally:
            seconds = time.perf_counter() - started
            self._history.append((len(batch), seconds))
            if self.on_batch is not None:
                try:
                    self.on_batch(len(batch), seconds)
                except Exception:
                    logger.exception("%s: on_batch hook failed", self.name)
            for i, pending in enumerate(batch):
                if pending.future.done():  # caller left or timed out while the batch ran
                    continue
                if error is None:
                    pending.future.set_result(results[i])
                else:
                    pending.future.set_exception(_copy_error(error))

    async def _run(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                if not batch:
                    continue
                if self._stopping and not self._drain:
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(unavailable(f"{self.name} is shutting down"))
                    continue
                await self._execute(batch)
        except asyncio.CancelledError:
            self._fail_queued(unavailable(f"{self.name} stopped"))
            raise
        except Exception:  # a bug here must not leave callers waiting forever
            logger.exception("%s: scheduler failed", self.name)
            self._stopping = True
            self._fail_queued(ServiceError(grpc.StatusCode.INTERNAL, f"{self.name}: scheduler failed"))


def _copy_error(error: BaseException) -> BaseException:
    """One exception object per waiter: re-raising a shared one in many tasks tangles tracebacks."""
    if isinstance(error, ServiceError):
        copy = dataclasses.replace(error)
        copy.__cause__ = error.__cause__
        return copy
    return error
