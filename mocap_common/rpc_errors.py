"""`ServiceError` ⇄ `google.rpc.Status` on the wire (server and client side), and
`mapped_errors`, the one place a handler's named domain errors become ServiceErrors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc.aio import AbortError
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mocap_common.errors import (
    INTERNAL_MESSAGE,
    ErrorTable,
    FieldViolation,
    Internal,
    ServiceError,
    mapped_error,
    status_proto,
)
from mocap_common.logs import get_logger

log = get_logger(__name__)


def to_grpc_status(error: ServiceError) -> grpc.Status:
    """The rich status for `error`, ready for `context.abort_with_status`."""
    return rpc_status.to_status(status_proto(error))


def internal_status() -> grpc.Status:
    """What a client sees for an unexpected exception: nothing of the internals."""
    return to_grpc_status(Internal(INTERNAL_MESSAGE))


class mapped_errors:  # noqa: N801 - used like a function: `with mapped_errors(TABLE):`
    """Around a handler's body (`with` or `async with`): a named domain error leaves it as the
    ServiceError its `table` row gives; a ServiceError passes unchanged (it is already a status).
    Any other exception becomes INTERNAL with a fixed message, its text and traceback going to the
    log only: raw exception text can hold paths, addresses or transport text.

    Cancellation and GeneratorExit (not Exceptions) pass, and so does gRPC's AbortError (the
    handler called context.abort: the status is already on its way). It works around `yield`, so
    the same block serves unary and streaming handlers.
    """

    def __init__(self, table: ErrorTable) -> None:
        self._table = table

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None, tb: Any) -> bool:
        if error is None or not isinstance(error, Exception) or isinstance(error, (ServiceError, AbortError)):
            return False  # re-raised as it is
        mapped = mapped_error(self._table, error)
        if mapped is None:
            log.error("unmapped error in a handler", error_type=type(error).__name__, detail=str(error),
                      exc_info=error)
            raise Internal(INTERNAL_MESSAGE) from error
        raise mapped from error

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: type[BaseException] | None, error: BaseException | None, tb: Any) -> bool:
        return self.__exit__(exc_type, error, tb)


@dataclass
class RpcErrorDetails:
    """The parts of a rich gRPC error a client program switches on."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_s: float | None = None

    def __str__(self) -> str:
        text = f"{self.code.name}"
        if self.reason:
            text += f" [{self.reason}]"
        text += f": {self.message}"
        for v in self.violations:
            text += f"\n  - {v.field}: {v.description}"
        return text


def describe_rpc_error(error: grpc.RpcError) -> RpcErrorDetails:
    """Reads code, message, ErrorInfo, BadRequest and RetryInfo of a failed call (sync or aio)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    result = RpcErrorDetails(code=code, message=message or "")
    getter = getattr(error, "trailing_metadata", None)
    for key, value in (getter() if callable(getter) else None) or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                _merge_detail(result, detail)
    return result


def _merge_detail(result: RpcErrorDetails, detail: any_pb2.Any) -> None:
    info, bad, retry = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
    if detail.Unpack(info):
        result.reason, result.domain, result.metadata = info.reason, info.domain, dict(info.metadata)
    elif detail.Unpack(bad):
        result.violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
    elif detail.Unpack(retry):
        result.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
