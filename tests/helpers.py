"""Test helpers: run a service's aio server in a background thread so sync clients can call it.

A sync client (reflection's descriptor database, grpc health) inside the aio server's own event loop
would deadlock it; a thread with its own loop keeps the two apart, as in production.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc.server import GrpcServer
from dramaturg.shared.service import Service, serving


class ServerThread:
    def __init__(
        self, service: Service, settings: ServerSettings | None = None, wait_ready: bool = True
    ) -> None:
        self.service = service
        self.settings = settings or ServerSettings(port=0, drain_notice_seconds=0.0, drain_grace_seconds=2.0)
        self.wait_ready = wait_ready
        self.server: GrpcServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._bound = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced in __enter__/__exit__
            self._error = exc
        finally:
            self._bound.set()
            self._ready.set()

    def _on_bound(self, server: GrpcServer) -> None:
        self.server = server
        self._bound.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serving(self.service, self.settings, on_bound=self._on_bound):
            self._ready.set()
            await self._stop.wait()

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._bound.wait(60)
        if self.wait_ready:
            self._ready.wait(120)
        if self._error:
            raise self._error
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. ``server.stop()``)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._error:
            raise self._error


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "the condition",
             interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
