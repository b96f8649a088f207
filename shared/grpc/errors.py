"""Errors a user can act on: one exception type that carries a gRPC status and google.rpc details.

Service code raises :class:`ServiceError` (or one of the helpers below); the shared server
interceptor turns it into ``context.abort_with_status`` with ``BadRequest`` / ``ErrorInfo`` /
``RetryInfo`` details packed by grpcio-status, so every service answers errors the same way.
Clients read them back with :func:`details_from_error`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "dramaturg.dev"


@dataclass
class ServiceError(Exception):
    """A failure with the status code and details the client should see."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    field_violations: Sequence[tuple[str, str]] = ()
    retry_after_seconds: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if not self.reason:
            self.reason = self.code.name

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status_proto(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=dict(self.metadata))
        details.append(_pack(info))
        if self.field_violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
            details.append(_pack(bad))
        if self.retry_after_seconds is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_seconds * 1e9))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(field_path: str, description: str, reason: str = "INVALID_ARGUMENT") -> ServiceError:
    """A field of the request is wrong; ``description`` says how to fix it."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field_path}: {description}" if field_path else description,
        reason=reason,
        field_violations=[(field_path, description)] if field_path else (),
    )


def not_found(kind: str, name: str, hint: str = "") -> ServiceError:
    message = f"{kind} {name!r} not found" + (f"; {hint}" if hint else "")
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        message,
        reason=f"{kind.upper()}_NOT_FOUND",
        metadata={"kind": kind, "name": name},
    )


def already_exists(kind: str, name: str, hint: str = "") -> ServiceError:
    message = f"{kind} {name!r} already exists" + (f"; {hint}" if hint else "")
    return ServiceError(
        grpc.StatusCode.ALREADY_EXISTS,
        message,
        reason=f"{kind.upper()}_EXISTS",
        metadata={"kind": kind, "name": name},
    )


def failed_precondition(message: str, reason: str = "FAILED_PRECONDITION") -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason=reason)


def resource_exhausted(message: str, retry_after_seconds: float, reason: str = "QUEUE_FULL") -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason=reason, retry_after_seconds=retry_after_seconds
    )


def unavailable(message: str, retry_after_seconds: float = 1.0, reason: str = "UNAVAILABLE") -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, message, reason=reason, retry_after_seconds=retry_after_seconds
    )


def deadline_exceeded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message, reason="DEADLINE_EXCEEDED")


def cancelled(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.CANCELLED, message, reason="CANCELLED")


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, reason="UNAUTHENTICATED")


@dataclass
class ErrorDetails:
    """What a client can read from a failed call."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_seconds: float | None = None


def details_from_error(error: grpc.RpcError) -> ErrorDetails:
    """Unpack the google.rpc details of a failed sync or aio call (trailing metadata)."""
    code = error.code()
    message = error.details() or ""
    out = ErrorDetails(code=code, message=message)
    trailers = error.trailing_metadata() or ()
    raw = next((v for k, v in trailers if k == rpc_status.GRPC_DETAILS_METADATA_KEY), None)
    if raw is None:
        return out
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason, out.metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.field_violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_after_seconds = retry.retry_delay.ToNanoseconds() / 1e9
    return out
