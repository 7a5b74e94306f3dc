"""Server bootstrap shared by every service.

    host = ServiceHost(config)
    host.add_servicer(add_GatewayServiceServicer_to_server, servicer, gateway_pb2, "GatewayService")
    host.on_shutdown(store.close)          # released in reverse order, each even if another fails
    await host.start()                      # listening; health says NOT_SERVING
    ... open stores, load models ...
    await host.set_serving()                # health says SERVING
    await host.wait_for_termination()       # until SIGTERM/SIGINT, then graceful shutdown

Graceful shutdown: health flips to NOT_SERVING (load balancers stop routing), the server stops
accepting calls and lets in-flight ones finish for `grace_seconds`, then cancels the rest; then
the shutdown callbacks run.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mocap_common.config import ServiceConfig
from mocap_common.interceptors import ServerInterceptor
from mocap_common.logs import get_logger
from mocap_common.metrics import serve_metrics

log = get_logger(__name__)

# Messages carry pose tracks and file chunks; 64 MiB leaves room for long takes in unary Smooth.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC refuses a received message over the limit itself (RESOURCE_EXHAUSTED, no ErrorInfo, the
# handler only sees its call cancelled). A service whose API documents a smaller limit for a
# field can raise its transport limit above that (`ServiceHost(max_receive_message_bytes=...)`)
# so the handler sees an oversized message and refuses it with a reason and a field violation.
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)

ShutdownCallback = Callable[[], Awaitable[Any] | Any]


class ServiceHost:
    """A grpc.aio server with health, reflection, interceptors, metrics and graceful shutdown."""

    def __init__(self, config: ServiceConfig, interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                 quiet_methods: tuple[str, ...] = (), max_receive_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        """`quiet_methods`: full method names ("/mocap.v1.ResourceService/Acquire") logged only
        when they fail (high-rate calls); they are still measured. `max_receive_message_bytes`:
        the transport's limit on one received message (see SERVER_OPTIONS)."""
        self.config = config
        options = tuple((k, max_receive_message_bytes if k == "grpc.max_receive_message_length" else v)
                        for k, v in SERVER_OPTIONS)
        self.server = grpc.aio.server(interceptors=(ServerInterceptor(quiet_methods), *interceptors),
                                      options=options)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._shutdown_callbacks: list[tuple[str, ShutdownCallback]] = []
        self._stopping = asyncio.Event()
        self._stopped = False
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None

    def add_servicer(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any,
                     pb2_module: ModuleType, service: str) -> None:
        """Registers a servicer; `service` is its name in `pb2_module` (for health and reflection)."""
        add_fn(servicer, self.server)
        self._service_names.append(pb2_module.DESCRIPTOR.services_by_name[service].full_name)

    def on_shutdown(self, callback: ShutdownCallback, name: str | None = None) -> None:
        """Registers a release step; steps run in reverse order, each even if an earlier one fails."""
        self._shutdown_callbacks.append((name or getattr(callback, "__qualname__", repr(callback)), callback))

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Binds the port and starts serving; health reports NOT_SERVING until set_serving()."""
        names = [*self._service_names, reflection.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise SystemExit(f"cannot listen on {self.config.host}:{self.config.port}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.metrics_port = self.config.resolved_metrics_port(self.port)
        if self.metrics_port:
            self._metrics_server = serve_metrics(self.metrics_port, self.config.host)
            self.on_shutdown(self._metrics_server.shutdown, "metrics-http")
        log.info("listening", address=self.address, metrics_port=self.metrics_port, services=self._service_names)

    async def set_serving(self, serving: bool = True) -> None:
        """Health SERVING only when the service is really ready (store open, model loaded, ...)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._set_all(status)
        log.info("health", serving=serving)

    async def _set_all(self, status: int) -> None:
        await self.health.set("", status)
        for name in self._service_names:
            await self.health.set(name, status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_for_termination(self) -> None:
        """Waits for SIGTERM/SIGINT (or request_stop), then shuts down gracefully."""
        self.install_signal_handlers()
        await self._stopping.wait()
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, drains in-flight ones for the grace period, releases everything."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down", grace_seconds=grace)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await run_release_steps(self._shutdown_callbacks)
        log.info("stopped")


async def run_release_steps(steps: list[tuple[str, ShutdownCallback]]) -> None:
    """Runs release steps in reverse order; a failing step is logged and the others still run."""
    for name, step in reversed(steps):
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - one failed release must not skip the others
            log.exception("release step failed", step=name)


def run_main(main: Callable[[], Awaitable[None]]) -> None:
    """Entry point helper for `python -m <service>`: runs the service's async main."""
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # second Ctrl-C during shutdown
        pass
