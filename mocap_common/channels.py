"""Client channels between services: message limits, keepalive, request-id propagation and
deadline propagation.

Python gRPC does not propagate deadlines by itself: a handler that calls another service passes
`timeout=downstream_timeout(context)` so the callee never works past the caller's deadline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from mocap_common.interceptors import REQUEST_ID_HEADER
from mocap_common.logs import current_context
from mocap_common.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Fail fast when a peer is down instead of backing off for minutes; callers own retries.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
)


def open_channel(target: str, extra_options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """An insecure aio channel to another mesh service, propagating the caller's request id."""
    return grpc.aio.insecure_channel(
        target,
        options=(*CHANNEL_OPTIONS, *extra_options),
        interceptors=(
            _RequestIdUnaryUnary(),
            _RequestIdUnaryStream(),
            _RequestIdStreamUnary(),
            _RequestIdStreamStream(),
        ),
    )


def downstream_timeout(context: grpc.aio.ServicerContext | None, cap: float | None = None) -> float | None:
    """Seconds a downstream call may take: the caller's remaining time, at most `cap`."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return cap
    return min(remaining, cap) if cap is not None else remaining


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = current_context().get("request_id")
    metadata = list(details.metadata or ())
    if request_id and not any(k == REQUEST_ID_HEADER for k, _ in metadata):
        metadata.append((REQUEST_ID_HEADER, str(request_id)))
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _RequestIdUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _RequestIdUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _RequestIdStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_request_id(details), request_iterator)


class _RequestIdStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_request_id(details), request_iterator)
