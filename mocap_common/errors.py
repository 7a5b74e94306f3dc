"""The errors every service raises, as plain Python (no gRPC import).

Domain code raises `ServiceError` subclasses; the server bootstrap's interceptor turns each into
a `google.rpc.Status` with an `ErrorInfo` (domain `mocapmesh.dev`, reason from
`protos/mocap/v1/errors.proto`) and, where given, `BadRequest` field violations and `RetryInfo`
(`mocap_common.rpc_errors`). Anything else that escapes a handler becomes INTERNAL with a
message that leaks nothing; the traceback goes to the log.

    ServiceError                 status code
    ├── InvalidArgument          INVALID_ARGUMENT (+ BadRequest)
    ├── NotFound                 NOT_FOUND
    ├── AlreadyExists            ALREADY_EXISTS
    ├── FailedPrecondition       FAILED_PRECONDITION
    ├── ResourceExhausted        RESOURCE_EXHAUSTED (+ RetryInfo)
    ├── Unavailable              UNAVAILABLE (+ RetryInfo)
    ├── DeadlineExceeded         DEADLINE_EXCEEDED
    ├── Aborted                  ABORTED
    ├── Cancelled                CANCELLED
    ├── OutOfRange               OUT_OF_RANGE
    ├── Unauthenticated          UNAUTHENTICATED
    └── Internal                 INTERNAL (the message is shown: keep internals out of it)

Named domain errors (a service's own exception tree, e.g. `tracker_svc.errors`) are mapped to
these in one table per service, applied to every handler by `mocap_common.rpc_errors.mapped_errors`:

    TRACKER_ERRORS: ErrorTable = {
        LeaseLost:  As(Aborted, "LEASE_LOST", "the inference lease was lost; tracking stopped ({error})"),
        VideoError: As(InvalidArgument, "DECODE_FAILED", details=lambda e: {"violations": [...]}),
        ...
    }

A row is found by the error's class, most specific first (its MRO). A reason has one status code
across the mesh (LEASE_LOST is ABORTED everywhere: the holder must start over from Acquire).

`status_proto` builds that google.rpc.Status as a message (protobuf only): the interceptor sends
it, and a message field of type google.rpc.Status (JobError.status) carries the same shape.
Clients read the details back with `mocap_common.rpc_errors.describe_rpc_error`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from mocap.v1 import errors_pb2

ERROR_DOMAIN = "mocapmesh.dev"
# What a client sees for an exception nobody named: nothing of the internals.
INTERNAL_MESSAGE = "internal error; the server log has the details"
_REASON_PREFIX = "ERROR_REASON_"


def reason_name(reason: str) -> str:
    """Checks that `reason` is declared in errors.proto and returns it (without prefix)."""
    try:
        errors_pb2.ErrorReason.Value(_REASON_PREFIX + reason)
    except ValueError:
        raise ValueError(f"error reason {reason!r} is not declared in protos/mocap/v1/errors.proto") from None
    return reason


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: `field` is a path such as "header.filename"."""

    field: str
    description: str


class ServiceError(Exception):
    """An error with a status code name, a reason from errors.proto and optional details."""

    code: ClassVar[str] = "UNKNOWN"  # a grpc.StatusCode name
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        violations: list[FieldViolation] | tuple[FieldViolation, ...] = (),
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason_name(reason or self.default_reason)
        self.violations = tuple(violations)
        self.retry_after_s = retry_after_s
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message!r})"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_FIELD"


class NotFound(ServiceError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"
    default_reason = "NOT_READY"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Aborted(ServiceError):
    code = "ABORTED"


class Cancelled(ServiceError):
    code = "CANCELLED"
    default_reason = "CANCELLED"


class OutOfRange(ServiceError):
    code = "OUT_OF_RANGE"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class Internal(ServiceError):
    code = "INTERNAL"
    default_reason = "INTERNAL"


@dataclass(frozen=True)
class As:
    """One row of an error table: how a named domain error reaches clients.

    `status` is the ServiceError class (so the status code); `reason` is from errors.proto (None:
    the class's default); `message` is formatted with `error=` the domain error (its own text by
    default: domain messages are written to be shown); `retry_after_s` adds a RetryInfo;
    `details(error)` returns further ServiceError keyword arguments taken from the error
    (`violations`, `metadata`, `retry_after_s`).
    """

    status: type[ServiceError]
    reason: str | None = None
    message: str = "{error}"
    retry_after_s: float | None = None
    details: Callable[[Any], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.reason is not None:
            reason_name(self.reason)  # an undeclared reason fails at import, not at the first error

    def service_error(self, error: BaseException) -> ServiceError:
        extra: dict[str, Any] = {}
        if self.retry_after_s is not None:
            extra["retry_after_s"] = self.retry_after_s
        if self.details is not None:
            extra.update(self.details(error))
        return self.status(self.message.format(error=error), reason=self.reason, **extra)


# {domain error class: its row}; one per service, next to its gRPC adapter.
ErrorTable = Mapping[type[BaseException], As]


def mapped_error(table: ErrorTable, error: BaseException) -> ServiceError | None:
    """The ServiceError `table` maps `error` to (the row of its most specific class), or None."""
    for cls in type(error).__mro__:
        row = table.get(cls)
        if row is not None:
            return row.service_error(error)
    return None


def status_proto(error: ServiceError) -> status_pb2.Status:
    """`error` as a google.rpc.Status: its code, its message, and details holding an ErrorInfo
    (domain, reason, metadata), then BadRequest and RetryInfo when the error has them."""
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata))]
    if error.violations:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message, details=details)


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
