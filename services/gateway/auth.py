"""Bearer-token authentication for the gateway's own RPCs.

Health and reflection stay open, so Kubernetes probes and grpcurl's discovery work without a secret;
every ``dramaturg.gateway.v1.Gateway`` call needs ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc
from dramaturg.shared.grpc.errors import unauthenticated
from dramaturg.shared.tokens import TOKEN_ENV, ensure_token_file, resolve_token

__all__ = ["TOKEN_ENV", "BearerTokenInterceptor", "ensure_token_file", "resolve_token"]

PROTECTED_PREFIX = "/dramaturg."


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        presented = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if presented is not None and hmac.compare_digest(
            presented.encode() if isinstance(presented, str) else presented, self._expected
        ):
            return handler
        reason = "no authorization metadata" if presented is None else "the bearer token does not match"
        error = unauthenticated(
            f"{reason}: send 'authorization: Bearer <token>' (the CLI reads {TOKEN_ENV} or "
            "$DRAMATURG_HOME/api-token)"
        )

        async def deny_unary(request, context):
            await context.abort_with_status(error.to_grpc_status())

        async def deny_stream(request, context):
            await context.abort_with_status(error.to_grpc_status())
            yield  # pragma: no cover - makes this an async generator

        if handler.response_streaming:
            factory = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            return factory(deny_stream, handler.request_deserializer, handler.response_serializer)
        factory = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return factory(deny_unary, handler.request_deserializer, handler.response_serializer)
