"""Client side, written once: channels with audio-sized limits, request ids, bearer tokens, retries.

The gateway uses :class:`ChannelPool` to reach model services; the CLI and tests use
:func:`open_channel`. Retries on UNAVAILABLE are left to gRPC's own service config so they follow the
standard back-off; the gateway's stage runner adds job-level retries with RetryInfo on top.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import grpc
from dramaturg.shared.config import MiB
from dramaturg.shared.grpc.interceptors import REQUEST_ID_KEY
from dramaturg.shared.grpc.server import channel_options
from dramaturg.shared.logs import request_id_var

_RETRY_POLICY = json.dumps(
    {
        # round_robin: a headless Service resolves to every pod, so replicas an autoscaler adds get traffic
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class _Metadata:
    """Adds the bearer token and the current request id to every call."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or ())
        keys = {k for k, _ in metadata}
        if self.token and "authorization" not in keys:
            metadata.append(("authorization", f"Bearer {self.token}"))
        rid = request_id_var.get()
        if rid and rid != "-" and REQUEST_ID_KEY not in keys:
            metadata.append((REQUEST_ID_KEY, rid))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first RPC shape it matches (an if/elif chain), so one
# object implementing all four shapes would only see unary calls: one class per shape.
class _UnaryUnary(_Metadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self.details(details), request)


class _UnaryStream(_Metadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self.details(details), request)


class _StreamUnary(_Metadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self.details(details), request_iterator)


class _StreamStream(_Metadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self.details(details), request_iterator)


def open_channel(
    target: str,
    *,
    token: str | None = None,
    tls_ca_file: str | None = None,
    max_message_bytes: int = 64 * MiB,
) -> grpc.aio.Channel:
    """An aio channel to ``host:port`` with the project's limits, retry policy and metadata."""
    options: Sequence = [
        *channel_options(max_message_bytes),
        ("grpc.service_config", _RETRY_POLICY),
        ("grpc.enable_retries", 1),
    ]
    interceptors = [cls(token) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    if tls_ca_file:
        creds = grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes())
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


class ChannelPool:
    """One channel per configured service, opened on first use."""

    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints = dict(endpoints)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            target = self.endpoints.get(service)
            if not target:
                from dramaturg.shared.grpc.errors import failed_precondition

                raise failed_precondition(
                    f"the gateway has no endpoint for the {service} service; set services.{service} "
                    "in the gateway config (dramaturg up does this for every built service)",
                    reason="SERVICE_NOT_CONFIGURED",
                )
            self._channels[service] = open_channel(target)
        return self._channels[service]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def wait_for_serving(
    target: str, *, service: str = "", timeout: float = 120.0, tls_ca_file: str | None = None
) -> bool:
    """Block until the gRPC health service at ``target`` says SERVING (what a readiness probe checks)."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    creds = grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes()) if tls_ca_file else None
    while time.monotonic() < deadline:
        channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass
        finally:
            channel.close()
        time.sleep(0.25)
    return False
