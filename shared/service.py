"""The lifecycle every dramaturg service shares: bind, load, serve, drain.

A service is a small class that lists the gRPC services it mounts and knows how to load and release
its model (which services exist is the business of :mod:`dramaturg.shared.registry`).
:func:`run_service` does the rest the same way for all of them: the server binds first (so health
probes answer NOT_SERVING during a long model load), then the model loads, then health flips to
SERVING; SIGTERM drains.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from dramaturg.shared import metrics
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc.server import GrpcServer, Registration

log = logging.getLogger(__name__)

class Service(abc.ABC):
    """A dramaturg service: the gRPC services it mounts, plus how to load and release its model."""

    name: str

    @abc.abstractmethod
    def registrations(self) -> list[Registration]: ...

    def interceptors(self) -> list:
        """Extra server interceptors (the gateway adds authentication)."""
        return []

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load models, open stores. Runs after the port is bound, before health says SERVING."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` acquired. Runs after the server drained."""


@contextlib.asynccontextmanager
async def serving(
    service: Service, settings: ServerSettings, on_bound: Callable[[GrpcServer], None] | None = None
) -> AsyncIterator[GrpcServer]:
    """Run ``service`` until the block exits; yields the started server once its model is loaded.

    ``on_bound`` is called after the port is bound and before the model loads (health: NOT_SERVING).
    """
    server = GrpcServer(service.name, settings, interceptors=service.interceptors())
    for registration in service.registrations():
        server.add(registration)
    await server.start()
    if on_bound is not None:
        on_bound(server)
    try:
        await service.start()
        await server.set_serving(True)
        metrics.SERVICE_READY.labels(service.name).set(1)
        yield server
    finally:
        metrics.SERVICE_READY.labels(service.name).set(0)
        await server.stop()
        await service.stop()


async def run_service(service: Service, settings: ServerSettings) -> None:
    """Serve until SIGTERM/SIGINT, with ``/metrics`` on ``settings.metrics_port`` when set."""
    if settings.metrics_port is not None:
        port = metrics.start_metrics_server(settings.metrics_port, settings.host)
        log.info("%s metrics on http://%s:%s/metrics", service.name, settings.host, port)
    async with serving(service, settings) as server:
        server.install_signal_handlers()
        log.info("%s ready on %s", service.name, server.address)
        await server.wait_for_termination()


def serve_forever(service: Service, settings: ServerSettings) -> None:
    asyncio.run(run_service(service, settings))
