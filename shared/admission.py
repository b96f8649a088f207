"""Admission control for heavy requests: a few run, a bounded number wait, the rest come back later.

A diarization, a synthesis or a long generation uses every core (or the GPU) on its own, so running
more at once only makes each slower and multiplies peak memory; clients are better told when to come
back. :class:`ConcurrencyLimiter` is a semaphore with a bounded waiting room: a full room answers
RESOURCE_EXHAUSTED with a RetryInfo delay estimated from recent run times, and a request whose
deadline passes while it waits gets DEADLINE_EXCEEDED. The waiting room is exported as
``dramaturg_queue_depth`` / ``dramaturg_queue_capacity`` (what the dashboards, the "queue saturated"
alert and the HPA component read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from dramaturg.shared import metrics
from dramaturg.shared.grpc.errors import deadline_exceeded, resource_exhausted


class ConcurrencyLimiter:
    """At most ``max_running`` at once, ``max_waiting`` queued; ``service`` and ``queue`` label metrics."""

    def __init__(self, service: str, max_running: int, max_waiting: int, *, queue: str,
                 work: str = "request") -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"max_running must be ≥ 1 and max_waiting ≥ 0, got {max_running}, {max_waiting}")
        self.service = service
        self.work = work  # what a slot runs, for messages ("diarization", "synthesis")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._semaphore = asyncio.Semaphore(max_running)
        self.running = 0
        self._waiting = 0
        self._mean_seconds = 10.0  # moving average of a run, for the retry delay
        self._depth = metrics.QUEUE_DEPTH.labels(service, queue)
        metrics.QUEUE_CAPACITY.labels(service, queue).set(max_waiting)
        self._depth.set(0)

    @property
    def waiting(self) -> int:
        return self._waiting

    @waiting.setter
    def waiting(self, value: int) -> None:
        self._waiting = value
        self._depth.set(value)

    def retry_after(self) -> float:
        rounds = (self.waiting + self.running) / self.max_running
        return round(max(1.0, self._mean_seconds * max(rounds, 1.0)), 1)

    def check_admission(self) -> None:
        """RESOURCE_EXHAUSTED (with RetryInfo) when every slot runs and the waiting room is full."""
        if self.running >= self.max_running and self.waiting >= self.max_waiting:
            raise resource_exhausted(
                f"the {self.service} service is busy ({self.running} running, {self.waiting} waiting); "
                f"retry in about {self.retry_after():g} s",
                retry_after_seconds=self.retry_after(),
            )

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float | None, *, admit: bool = True) -> AsyncIterator[None]:
        """Hold a run slot; ``admit=False`` (a stream already admitted) waits instead of refusing."""
        if admit:
            self.check_admission()
        self.waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._semaphore.acquire(), timeout)
            except TimeoutError:
                raise deadline_exceeded(
                    f"the deadline passed while waiting for a free {self.work} slot; retry with a longer "
                    "deadline or when the service is less busy"
                ) from None
        finally:
            self.waiting -= 1
        self.running += 1
        began = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.monotonic() - began)
            self._semaphore.release()
