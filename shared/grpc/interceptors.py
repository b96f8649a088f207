"""One server interceptor for every service: request ids, metrics, and errors as gRPC statuses.

It wraps all four RPC shapes of grpc.aio (unary and streaming), so handlers stay plain: they raise
:class:`~dramaturg.shared.grpc.errors.ServiceError` and the interceptor answers with the status and
google.rpc details; anything else becomes INTERNAL with the request id to look up in the logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from dramaturg.shared import metrics
from dramaturg.shared.grpc.errors import ServiceError
from dramaturg.shared.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# A request id is echoed in the x-request-id header and every log line: a longer one (or one with
# characters a header cannot carry) is shortened to its head plus a hash of the whole, still unique
# and searchable, so a 20,000-character id cannot push the answer's headers past the client's limit.
MAX_REQUEST_ID_CHARS = 128
# Probes and schema discovery should not count as traffic or need a request id.
_QUIET_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``)."""
    _, service, method = full_method.split("/", 2)
    return service, method


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def bounded_request_id(rid: str) -> str:
    """``rid`` itself when short and printable; else its first 64 characters, ``~`` and a hash of it."""
    if len(rid) <= MAX_REQUEST_ID_CHARS and rid.isprintable() and rid.isascii():
        return rid
    head = "".join(c if c.isascii() and c.isprintable() else "_" for c in rid[:64])
    return f"{head}~{hashlib.sha256(rid.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def current_request_id() -> str:
    return request_id_var.get()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline as an absolute ``time.monotonic()`` value, or None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Request-id propagation, Prometheus RPC families, and ServiceError → status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = split_method(details.method)
        quiet = service in _QUIET_SERVICES
        rid_from_metadata = _metadata_value(details.invocation_metadata, REQUEST_ID_KEY)
        kind = (
            "bidi_stream"
            if handler.request_streaming and handler.response_streaming
            else "client_stream"
            if handler.request_streaming
            else "server_stream"
            if handler.response_streaming
            else "unary"
        )
        labels = (kind, service, method)
        wrap = _wrap_streaming if handler.response_streaming else _wrap_unary
        behavior = (
            handler.stream_stream or handler.unary_stream
            if handler.response_streaming
            else handler.stream_unary or handler.unary_unary
        )
        wrapped = wrap(behavior, labels, rid_from_metadata, quiet, handler.request_streaming)
        factory = {
            "unary": grpc.unary_unary_rpc_method_handler,
            "server_stream": grpc.unary_stream_rpc_method_handler,
            "client_stream": grpc.stream_unary_rpc_method_handler,
            "bidi_stream": grpc.stream_stream_rpc_method_handler,
        }[kind]
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Call:
    """Bookkeeping shared by the unary and streaming wrappers."""

    def __init__(self, labels: tuple[str, str, str], rid: str | None, quiet: bool) -> None:
        self.labels = labels
        self.quiet = quiet
        self.rid = rid
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()

    def begin(self, request: Any, context: grpc.aio.ServicerContext) -> contextvars_token:
        if not self.rid:
            self.rid = getattr(request, "request_id", "") or uuid.uuid4().hex[:16]
        self.rid = bounded_request_id(self.rid)
        if not self.quiet:
            metrics.GRPC_STARTED.labels(*self.labels).inc()
        return request_id_var.set(self.rid)

    async def fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, ServiceError):
            self.code = exc.code
            log.info("%s/%s → %s: %s", self.labels[1], self.labels[2], exc.code.name, exc.message)
            await context.abort_with_status(exc.to_grpc_status())
        self.code = grpc.StatusCode.INTERNAL
        log.exception("%s/%s failed", self.labels[1], self.labels[2])
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error while serving {self.labels[2]} (request id {self.rid}); "
            "the server log has the cause",
        )

    def finish(self, context: grpc.aio.ServicerContext) -> None:
        if self.quiet:
            return
        code = self.code
        if code == grpc.StatusCode.OK:
            try:
                code = context.code() or grpc.StatusCode.OK
            except Exception:  # older grpc: no code() on aio contexts
                code = grpc.StatusCode.OK
            if isinstance(code, int):
                code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        metrics.GRPC_HANDLED.labels(*self.labels, code.name).inc()
        metrics.GRPC_HANDLING_SECONDS.labels(*self.labels).observe(time.perf_counter() - self.start)


contextvars_token = Any


def _count_received(requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async def gen() -> AsyncIterator[Any]:
        async for item in requests:
            if not call.quiet:
                metrics.GRPC_MSG_RECEIVED.labels(*call.labels).inc()
            yield item

    return gen()


def _wrap_unary(
    behavior: Callable, labels: tuple[str, str, str], rid: str | None, quiet: bool, request_streaming: bool
) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(labels, rid, quiet)
        token = call.begin(None if request_streaming else request, context)
        if request_streaming:
            request = _count_received(request, call)
        try:
            if not quiet:
                await context.send_initial_metadata(((REQUEST_ID_KEY, call.rid),))
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(exc, context)
        finally:
            call.finish(context)
            request_id_var.reset(token)

    return wrapped


def _wrap_streaming(
    behavior: Callable, labels: tuple[str, str, str], rid: str | None, quiet: bool, request_streaming: bool
) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(labels, rid, quiet)
        token = call.begin(None if request_streaming else request, context)
        if request_streaming:
            request = _count_received(request, call)
        try:
            if not quiet:
                await context.send_initial_metadata(((REQUEST_ID_KEY, call.rid),))
            async for response in behavior(request, context):
                if not quiet:
                    metrics.GRPC_MSG_SENT.labels(*labels).inc()
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            call.code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await call.fail(exc, context)
        finally:
            call.finish(context)
            request_id_var.reset(token)

    return wrapped
