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

Clients read the details back with `mocap_common.rpc_errors.describe_rpc_error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mocap.v1 import errors_pb2

ERROR_DOMAIN = "mocapmesh.dev"
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
