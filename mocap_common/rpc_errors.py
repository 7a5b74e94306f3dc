"""`ServiceError` ⇄ `google.rpc.Status` on the wire (server and client side)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mocap_common.errors import ERROR_DOMAIN, FieldViolation, Internal, ServiceError


def to_grpc_status(error: ServiceError) -> grpc.Status:
    """The rich status for `error`, ready for `context.abort_with_status`."""
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
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code), message=error.message, details=details)
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    """What a client sees for an unexpected exception: nothing of the internals."""
    return to_grpc_status(Internal("internal error; the server log has the details"))


def status_code(error: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


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


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
