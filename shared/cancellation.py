"""Model runs an RPC can abandon: a cancelled call or a passed deadline stops the work at its next check.

A model call runs on the service's model threads (never the event loop). The work polls a
``should_stop()`` callable between batches (pyannote's hook, a generation loop's step, a synthesis
chunk) and raises :class:`Stopped` when it answers a reason; :func:`run_cancellable` wires that
callable to the RPC: the client cancelling (the awaiting task is cancelled) or the deadline passing.
The slot a caller holds is kept until the worker has really stopped, so a cancelled request cannot
let more runs share the machine than the service allows. Context variables (the request id the
logs carry) are copied into the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from dramaturg.shared.grpc.errors import cancelled, deadline_exceeded

T = TypeVar("T")
ShouldStop = Callable[[], "str | None"]


class Stopped(Exception):
    """Raised inside the work to abandon it; ``reason`` is ``"cancelled"`` or ``"deadline"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def never_stop() -> str | None:
    return None


async def run_cancellable(
    executor: Executor | None,
    work: Callable[[ShouldStop], T],
    deadline: float | None,
    *,
    what: str = "the request",
    deadline_hint: str = "",
) -> T:
    """Run ``work(should_stop)`` on ``executor``; stop it when the caller is cancelled or ``deadline`` passes.

    ``deadline`` is absolute ``time.monotonic()`` (``shared.grpc.interceptors.deadline_of``). The
    statuses name ``what`` was running; ``deadline_hint`` tells the user how to size a deadline.
    """
    stop = threading.Event()

    def should_stop() -> str | None:
        if stop.is_set():
            return "cancelled"
        if deadline is not None and time.monotonic() > deadline:
            return "deadline"
        return None

    context = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(executor, context.run, work, should_stop)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await future
        raise
    except Stopped as exc:
        if exc.reason == "deadline":
            raise deadline_exceeded(
                f"the RPC deadline passed while {what} ran" + (f"; {deadline_hint}" if deadline_hint else "")
            ) from None
        raise cancelled(f"{what} was cancelled") from None
