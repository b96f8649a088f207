"""The gateway: a gRPC front door that runs multi-stage jobs across the model services."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from dramaturg.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from dramaturg.services.gateway.auth import BearerTokenInterceptor, resolve_token
from dramaturg.services.gateway.catalog import PIPELINES
from dramaturg.services.gateway.config import GatewaySettings
from dramaturg.services.gateway.engine import JobEngine
from dramaturg.services.gateway.pipelines import AudioTransport, PipelineSpec
from dramaturg.services.gateway.store import open_store
from dramaturg.shared.blobs import BlobStore, default_blob_root
from dramaturg.shared.config import dramaturg_home
from dramaturg.shared.grpc.client import ChannelPool
from dramaturg.shared.grpc.server import Registration
from dramaturg.shared.service import Service

if TYPE_CHECKING:
    from dramaturg.services.gateway.console import ConsoleServer

log = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, engine: JobEngine) -> None:
        self.engine = engine

    async def SubmitJob(self, request: gateway_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext):
        return await self.engine.submit(request)

    async def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext):
        return self.engine.get(request.job_id)

    async def WatchJob(
        self, request: gateway_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.JobEvent]:
        async for event in self.engine.watch(request.job_id, request.after_sequence):
            yield event

    async def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.aio.ServicerContext):
        return await self.engine.cancel(request.job_id)

    async def ListJobs(self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext):
        return self.engine.list(request)

    async def GetJobFile(
        self, request: gateway_pb2.GetJobFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.JobFileChunk]:
        async for chunk in self.engine.read_file(request.job_id, request.name, request.offset):
            yield chunk

    async def ListPipelines(
        self, request: gateway_pb2.ListPipelinesRequest, context: grpc.aio.ServicerContext
    ):
        return gateway_pb2.ListPipelinesResponse(
            pipelines=[
                gateway_pb2.Pipeline(
                    name=p.name,
                    description=p.description,
                    stages=[
                        gateway_pb2.Stage(name=s.name, service=s.service, depends_on=list(s.depends_on))
                        for s in p.stages
                    ],
                )
                for p in self.engine.pipelines.values()
            ]
        )


def default_replica_id(port: int) -> str:
    """HOSTNAME:PORT — unique among gateways that can run at once, the same after a restart."""
    host = socket.gethostname()
    return f"{host}:{port}" if port else f"{host}-{uuid.uuid4().hex[:8]}"


class GatewayService(Service):
    name = "gateway"

    def __init__(
        self,
        settings: GatewaySettings,
        home: Path | None = None,
        pipelines: dict[str, PipelineSpec] | None = None,
    ) -> None:
        self.settings = settings
        self.home = home or dramaturg_home()
        token = resolve_token(settings.api_token, self.home)
        if not token:
            raise RuntimeError(
                "the gateway needs an API token: set DRAMATURG_API_TOKEN, api_token in the config, or "
                "create $DRAMATURG_HOME/api-token (`dramaturg up` generates one)"
            )
        self.token = token
        url = settings.job_store or f"sqlite:///{self.home / 'gateway' / 'jobs.db'}"
        self.store = open_store(url)
        self.channels = ChannelPool(settings.services)
        # The services find the blobs under their own DRAMATURG_HOME/blobs by default: with
        # audio_transport uri, gateway and services must see this folder at the same path.
        self.blobs = BlobStore(Path(settings.blob_root).expanduser() if settings.blob_root
                               else default_blob_root(self.home))
        self.engine = JobEngine(
            self.store,
            self.home / "gateway" / "jobs",
            pipelines or PIPELINES,
            self.channels,
            max_running=settings.max_running_jobs,
            max_pending=settings.max_pending_jobs,
            retry_base_seconds=settings.retry_base_seconds,
            service_down_patience_seconds=settings.service_down_patience_seconds,
            blobs=self.blobs,
            transport=AudioTransport(settings.audio_transport, settings.inline_message_limit_bytes),
            max_audio_seconds=settings.max_audio_seconds,
            audio_uri_roots=settings.audio_uri_roots,
            owner=settings.replica_id or default_replica_id(settings.server.port),
            lease_seconds=settings.lease_seconds,
        )
        log.info("job audio goes to the model services by %s (blobs under %s)",
                 settings.audio_transport, self.blobs.root)
        log.info("gateway replica %s: job leases of %gs in %s", self.engine.owner, settings.lease_seconds,
                 type(self.store).__name__)
        self.console: ConsoleServer | None = None

    @property
    def console_url(self) -> str | None:
        """Where the web console listens (its bound port when ``console_port`` is 0), None without one."""
        return self.console.url if self.console is not None else None

    def registrations(self) -> list[Registration]:
        return [
            Registration(
                gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
                gateway_pb2_grpc.add_GatewayServicer_to_server,
                GatewayServicer(self.engine),
            )
        ]

    def interceptors(self) -> list:
        return [BearerTokenInterceptor(self.token)]

    async def start(self) -> None:
        await self.engine.start()
        if self.settings.console_port is not None:
            await self._start_console()

    async def _start_console(self) -> None:
        """The web console on this process's event loop, calling this engine (services/gateway/console.py)."""
        try:
            from dramaturg.services.gateway.console import Console, ConsoleServer
        except ImportError as exc:  # starlette / uvicorn come with the gateway extra
            raise RuntimeError(f"the web console (console_port) needs the gateway extra: "
                               f"pip install 'dramaturg[gateway]' ({exc})") from exc
        settings = self.settings
        console = Console(self.engine, self.token, session_seconds=settings.console_session_hours * 3600,
                          max_upload_bytes=settings.server.max_message_bytes)
        host = settings.console_host or settings.server.host
        server = ConsoleServer(console, host, settings.console_port or 0,
                               tls_cert_file=settings.server.tls_cert_file,
                               tls_key_file=settings.server.tls_key_file)
        await server.start()
        self.console = server
        log.info("web console on %s (sign in with the API token)", server.url)

    async def stop(self) -> None:
        if self.console is not None:  # first: its event streams and requests use the engine
            await self.console.stop()
            self.console = None
        await self.engine.stop()
        await self.channels.close()
        self.store.close()


def create_service(settings: GatewaySettings | None = None) -> GatewayService:
    return GatewayService(settings or GatewaySettings())


SETTINGS = GatewaySettings
