"""Errors a user can act on: one exception type that carries a gRPC status and google.rpc details.

Service code raises :class:`ServiceError` (or one of the helpers below); the shared server
interceptor turns it into ``context.abort_with_status`` with ``BadRequest`` / ``ErrorInfo`` /
``RetryInfo`` details packed by grpcio-status, so every service answers errors the same way.
Clients read them back with :func:`details_from_error`.

Every status built here is bounded, whatever the request held. Messages often quote what the client
sent (a voice id, a URI), and gRPC carries the message twice in the trailers: percent-encoded in
``grpc-message`` and inside the base64 ``grpc-status-details-bin``. A 10,000-character voice id quoted
whole pushed the trailers past the client's metadata limit (gRPC's soft limit is 8 KiB, the hard one
16 KiB), so the caller saw a transport error instead of its INVALID_ARGUMENT. Building the status
(:meth:`ServiceError.to_status_proto`) therefore clips every text to a byte bound (``MAX_*_BYTES``)
and drops whole field violations and metadata entries past ``MAX_DETAILS_BYTES``; even all-multibyte
text (3 bytes per byte once percent-encoded) keeps the two trailers under about 7 KiB. Code that
quotes client input should also use :func:`echo`, which keeps both ends of a long value and says how
long it was.
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

#: Bounds in UTF-8 bytes. The message is at most 3 KiB percent-encoded in ``grpc-message``; the whole
#: google.rpc Status (message included) at most ``MAX_DETAILS_BYTES``, 4 KiB as base64: about 7 KiB of
#: trailers in the worst case, under gRPC's 8 KiB soft metadata limit with room for other trailers.
MAX_MESSAGE_BYTES = 1024
MAX_REASON_BYTES = 64
MAX_FIELD_PATH_BYTES = 128
MAX_DESCRIPTION_BYTES = 512
MAX_METADATA_KEY_BYTES = 64
MAX_METADATA_VALUE_BYTES = 256
MAX_DETAILS_BYTES = 3072
#: ErrorInfo metadata key that says what the byte budget left out.
TRUNCATED_KEY = "details_truncated"


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, marked as cut and saying how long it was.

    Cuts on a character boundary, so the result is valid UTF-8 (protobuf refuses anything else).
    """
    data = text.encode("utf-8", "replace")  # a lone surrogate becomes "?" rather than a failed send
    if len(data) <= max_bytes:
        return data.decode("utf-8")
    marker = f"… [cut, {len(data)} bytes in all]"
    keep = max(max_bytes - len(marker.encode()), 0)
    return data[:keep].decode("utf-8", "ignore") + marker


def echo(value: str, max_chars: int = 64) -> str:
    """Quote a client-supplied string in an error message without replaying all of it.

    ``repr`` makes control characters visible (a NUL shows as ``\\x00``); a value longer than
    ``max_chars`` keeps its start and end (where typos and extensions are) and gives its length, so the
    message stays readable and the status small however much the client sent.
    """
    if len(value) <= max_chars:
        return repr(value)
    half = max(max_chars // 2, 1)
    return f"{value[:half]!r}…{value[-half:]!r} ({len(value)} characters)"


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
        # Clipped here too, not only in the status: the interceptor logs the message.
        self.message = clip(self.message, MAX_MESSAGE_BYTES)
        super().__init__(self.message)
        if not self.reason:
            self.reason = self.code.name

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_status_proto(self) -> status_pb2.Status:
        """The google.rpc Status, bounded (see the module docstring): every text clipped, and field
        violations then metadata entries dropped from the end until it fits ``MAX_DETAILS_BYTES``; the
        first violation always stays, and ErrorInfo says what was dropped."""
        message = clip(self.message, MAX_MESSAGE_BYTES)
        reason = clip(self.reason, MAX_REASON_BYTES)
        metadata = [
            (clip(k, MAX_METADATA_KEY_BYTES), clip(v, MAX_METADATA_VALUE_BYTES))
            for k, v in self.metadata.items()
        ]
        violations = [
            (clip(f, MAX_FIELD_PATH_BYTES), clip(d, MAX_DESCRIPTION_BYTES)) for f, d in self.field_violations
        ]
        retry: duration_pb2.Duration | None = None
        if self.retry_after_seconds is not None:
            retry = duration_pb2.Duration()
            retry.FromNanoseconds(int(self.retry_after_seconds * 1e9))
        dropped_violations = dropped_metadata = 0
        while True:
            note = {}
            if dropped_violations or dropped_metadata:
                note[TRUNCATED_KEY] = (
                    f"{dropped_violations} field violation(s) and {dropped_metadata} metadata "
                    "entr(ies) left out to keep the status small"
                )
            status = self._status(message, reason, dict(metadata) | note, violations, retry)
            # Once nothing is left to drop the status is at most ~2 KiB (message, reason, one
            # violation and the note at their bounds), so the loop always ends within budget.
            if status.ByteSize() <= MAX_DETAILS_BYTES or (len(violations) <= 1 and not metadata):
                return status
            if len(violations) > 1:
                violations.pop()
                dropped_violations += 1
            else:
                metadata.pop()
                dropped_metadata += 1

    def _status(
        self,
        message: str,
        reason: str,
        metadata: dict[str, str],
        violations: Sequence[tuple[str, str]],
        retry: duration_pb2.Duration | None,
    ) -> status_pb2.Status:
        details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))]
        if violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
                ]
            )
            details.append(_pack(bad))
        if retry is not None:
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=retry)))
        return status_pb2.Status(code=self.code.value[0], message=message, details=details)

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
    message = f"{kind} {echo(name)} not found" + (f"; {hint}" if hint else "")
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        message,
        reason=f"{kind.upper()}_NOT_FOUND",
        metadata={"kind": kind, "name": name},
    )


def already_exists(kind: str, name: str, hint: str = "") -> ServiceError:
    message = f"{kind} {echo(name)} already exists" + (f"; {hint}" if hint else "")
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
