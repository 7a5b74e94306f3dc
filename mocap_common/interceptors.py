"""The server interceptor every service runs: context for logs, metrics per RPC, and the mapping
of `ServiceError` (and stray exceptions) to rich gRPC statuses.

One interceptor does all three because they share the same before/after points of a call and the
same view of its outcome (status code, latency).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc.aio import AbortError

from mocap_common import metrics
from mocap_common.errors import ServiceError
from mocap_common.logs import bound_context, get_logger
from mocap_common.rpc_errors import internal_status, to_grpc_status

log = get_logger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_HEALTH_AND_REFLECTION = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Logs, measures and maps errors for every RPC of a service.

    `quiet_methods` (full names, "/pkg.Service/Method") are measured like the others but logged
    only when they fail, like health checks: for high-rate calls (the lease broker's Acquire,
    Release, KeepAlive) one log line per successful call would dominate the log and the CPU.
    """

    def __init__(self, quiet_methods: "Iterable[str]" = ()) -> None:
        self._quiet_methods = frozenset(quiet_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        quiet = details.method.startswith(_HEALTH_AND_REFLECTION) or details.method in self._quiet_methods
        call = _CallInfo(details, quiet)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                call.wrap_unary(handler.unary_unary, "unary"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                call.wrap_unary(handler.stream_unary, "client_stream"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                call.wrap_stream(handler.unary_stream, "server_stream"),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            call.wrap_stream(handler.stream_stream, "bidi_stream"),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _CallInfo:
    def __init__(self, details: grpc.HandlerCallDetails, quiet: bool) -> None:
        _, service, method = details.method.split("/", 2)
        self.full_method = details.method
        self.service = service
        self.method = method
        self.quiet = quiet
        metadata = dict(details.invocation_metadata or ())
        self.request_id = str(metadata.get(REQUEST_ID_HEADER) or uuid.uuid4().hex[:16])

    def wrap_unary(self, behavior: Callable[..., Any], rpc_type: str) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request = self._count_stream(request, rpc_type)
            with self._observe(context, rpc_type) as outcome:
                try:
                    return await behavior(request, context)
                except BaseException as exc:  # noqa: BLE001 - mapped and re-raised below
                    await self._fail(exc, context, outcome)

        return handle

    def wrap_stream(self, behavior: Callable[..., Any], rpc_type: str) -> Callable[..., Any]:
        labels = (self.service, self.method, rpc_type)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = self._count_stream(request, rpc_type)
            with self._observe(context, rpc_type) as outcome:
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for message in result:
                            metrics.MSG_SENT.labels(*labels).inc()
                            yield message
                    else:  # a handler that writes with context.write and returns None
                        await result
                except BaseException as exc:  # noqa: BLE001 - mapped and re-raised below
                    await self._fail(exc, context, outcome)

        return handle

    def _count_stream(self, request: Any, rpc_type: str) -> Any:
        if rpc_type not in ("client_stream", "bidi_stream"):
            return request
        labels = (self.service, self.method, rpc_type)

        async def counted() -> AsyncIterator[Any]:
            async for message in request:
                metrics.MSG_RECEIVED.labels(*labels).inc()
                yield message

        return counted()

    def _observe(self, context: grpc.aio.ServicerContext, rpc_type: str) -> "_Observation":
        return _Observation(self, context, rpc_type)

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext, outcome: "_Observation") -> None:
        if isinstance(exc, ServiceError):
            outcome.code = exc.code
            outcome.reason = exc.reason
            await context.abort_with_status(to_grpc_status(exc))
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            # GeneratorExit: the client went away from a server stream; nothing to send back.
            outcome.code = "CANCELLED"
            raise exc
        if isinstance(exc, AbortError):
            raise exc
        outcome.code = "INTERNAL"
        log.exception("unhandled error in rpc", rpc=self.full_method)
        await context.abort_with_status(internal_status())


class _Observation:
    """Context manager around one call: log context, in-flight gauge, latency and outcome."""

    def __init__(self, call: _CallInfo, context: grpc.aio.ServicerContext, rpc_type: str) -> None:
        self.call, self.context, self.rpc_type = call, context, rpc_type
        self.code: str | None = None
        self.reason = ""

    def __enter__(self) -> "_Observation":
        c = self.call
        self._log_context = bound_context(rpc=c.full_method, request_id=c.request_id)
        self._log_context.__enter__()
        self.started = time.perf_counter()
        metrics.RPC_STARTED.labels(c.service, c.method, self.rpc_type).inc()
        metrics.RPC_IN_FLIGHT.labels(c.service, c.method).inc()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        c = self.call
        elapsed = time.perf_counter() - self.started
        code = self.code or _code_name(self.context) or ("CANCELLED" if exc_type is asyncio.CancelledError else "OK")
        metrics.RPC_IN_FLIGHT.labels(c.service, c.method).dec()
        metrics.RPC_HANDLED.labels(c.service, c.method, self.rpc_type, code).inc()
        metrics.RPC_SECONDS.labels(c.service, c.method, self.rpc_type).observe(elapsed)
        if not c.quiet or code != "OK":
            fields = {"code": code, "latency_ms": round(elapsed * 1000, 2)}
            if self.reason:
                fields["reason"] = self.reason
            if code in ("OK", "CANCELLED", "NOT_FOUND", "ALREADY_EXISTS"):
                log.info("rpc", **fields)
            elif code == "INTERNAL":
                log.error("rpc", **fields)
            else:
                log.warning("rpc", **fields)
        self._log_context.__exit__(exc_type, exc, tb)


def _code_name(context: grpc.aio.ServicerContext) -> str | None:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older/odd contexts: fall back to the exception
        return None
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return None
