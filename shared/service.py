"""The lifecycle every dramaturg service shares: bind, load, serve, drain.

A service is a small class that lists the gRPC services it mounts and knows how to load and release
its model. :func:`run_service` does the rest the same way for all of them: the server binds first (so
health probes answer NOT_SERVING during a long model load), then the model loads, then health flips
to SERVING; SIGTERM drains.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Callable

from dramaturg.shared import metrics
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc.server import GrpcServer, Registration

log = logging.getLogger(__name__)

# Every service the platform knows, built or not; `dramaturg serve NAME` imports the factory.
SERVICES: dict[str, str | None] = {
    "gateway": "dramaturg.services.gateway.server:create_service",
    "speaker": "dramaturg.services.speaker.server:create_service",
    "diarization": "dramaturg.services.diarization.server:create_service",
    "tts": None,
    "audiollm": None,
    "evaluator": None,
}


# Where each model service keeps its training recipes (import path of name → Recipe); None: not built.
RECIPES: dict[str, str | None] = {
    "speaker": "dramaturg.services.speaker.train:RECIPES",
    "diarization": "dramaturg.services.diarization.train:RECIPES",
    "tts": None,
    "audiollm": None,
    "evaluator": None,
}


class ServiceNotBuilt(RuntimeError):
    """Raised for a service whose folder exists in the plan but not yet in the code."""


def built_services() -> list[str]:
    return [name for name, target in SERVICES.items() if target]


def model_services() -> list[str]:
    return [name for name in built_services() if name != "gateway"]


def load_factory(name: str):
    if name not in SERVICES:
        raise KeyError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    target = SERVICES[name]
    if not target:
        raise ServiceNotBuilt(f"the {name} service is not built yet (see README: status)")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


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
