"""The aio gRPC server every dramaturg service runs on, bootstrapped the same way each time.

What a user of Triton or Riva expects, written once: gRPC health per service name (SERVING only once
the model is loaded, NOT_SERVING while draining), reflection, message limits sized for audio, a cap on
concurrent RPCs, the shared interceptor (request ids, metrics, error details), TLS when certificates
are configured, and a graceful drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from dramaturg.shared.config import ServerSettings
from dramaturg.shared.grpc.interceptors import ServerInterceptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class Registration:
    """One gRPC service to mount: its full name (``pkg.Service``), the generated adder, the servicer."""

    full_name: str
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits for audio payloads, the same on servers and clients."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class GrpcServer:
    """An aio server with health, reflection, the shared interceptor and a drain on SIGTERM."""

    def __init__(
        self, name: str, settings: ServerSettings, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    ) -> None:
        self.name = name
        self.settings = settings
        self._registrations: list[Registration] = []
        self._interceptors = [ServerInterceptor(), *interceptors]
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._draining = False
        self.port: int | None = None

    def add(self, registration: Registration) -> None:
        self._registrations.append(registration)

    @property
    def service_names(self) -> list[str]:
        return [r.full_name for r in self._registrations]

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving; health says NOT_SERVING until :meth:`set_serving` is called."""
        s = self.settings
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=[*channel_options(s.max_message_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        for r in self._registrations:
            r.add_to_server(r.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address = f"{s.host}:{s.port}"
        if s.tls_cert_file and s.tls_key_file:
            creds = grpc.ssl_server_credentials(
                [(Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())]
            )
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"{self.name}: could not bind {address}")
        await server.start()
        self._server = server
        await self.set_serving(False)
        log.info(
            "%s listening on %s:%s (%s)",
            self.name,
            s.host,
            self.port,
            "TLS" if s.tls_cert_file else "plaintext",
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Flip health for every mounted service and the server as a whole ("")."""
        status = SERVING if serving and not self._draining else NOT_SERVING
        for name in ["", *self.service_names]:
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: say NOT_SERVING so balancers stop routing, let in-flight RPCs finish, then stop."""
        if self._server is None or self._stopped.is_set():
            return
        self._draining = True
        await self.set_serving(False)
        grace = self.settings.drain_grace_seconds if grace is None else grace
        log.info(
            "%s draining (notice %.1fs, grace %.1fs)", self.name, self.settings.drain_notice_seconds, grace
        )
        await asyncio.sleep(self.settings.drain_notice_seconds)
        await self._server.stop(grace)
        self._stopped.set()
        log.info("%s stopped", self.name)

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT start a drain instead of killing in-flight requests."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()
