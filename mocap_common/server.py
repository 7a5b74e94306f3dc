"""Server bootstrap shared by every service: one shape for every `python -m <service>`.

    async def main() -> None:
        config = load_config(ExporterConfig, sys.argv[1:])
        configure_logging(config.service_name, config.log_level, config.log_format)
        async with ServiceHost(config) as host:
            await build(config, host)           # the service's one assembly function
            await host.serve_until_stopped()     # SERVING until SIGTERM/SIGINT

    async def build(config, host) -> None:
        store = open_store(config)
        host.on_release(store.close, "store")   # released in reverse order, each even if another fails
        host.on_stopping(hub.close, "watchers") # before the drain: long calls end early
        host.add_servicer(add_XServicer_to_server, XServicer(store), x_pb2, "XService")
        await host.start()                      # optional: listen (health NOT_SERVING) before slow work
        ... load models ...                     # health turns SERVING when build has returned

Servicers are registered before the server listens (grpc.aio allows no later registration, and
health and reflection list them), so entering the `async with` only takes over the signals and
the release steps; `start()` (or `serve_until_stopped()`) listens.

Leaving the `async with` — after SIGTERM/SIGINT, `request_stop()`, or an exception (a start-up
failure) — stops in one order: the `on_stopping` hooks (tell watchers to reconnect, end waiting
calls), then health NOT_SERVING (load balancers stop routing) and the server stops accepting calls
and lets in-flight ones finish for `grace_seconds` (no grace after a failure) before cancelling
them, then the release steps in reverse order of registration, each even if an earlier one failed.
A signal during start-up cancels `build` where it waits (its release steps registered so far
run); the process then exits 0, as after any requested stop. A failure propagates after the
release: `SystemExit("service: why")` is how a start-up step refuses with a clear message.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import Awaitable, Callable
from types import ModuleType, TracebackType
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
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

ShutdownCallback = Callable[[], Awaitable[Any] | Any]


class ServiceHost:
    """A grpc.aio server with health, reflection, interceptors, metrics and graceful shutdown;
    an `async with` that owns the stop (see the module docstring)."""

    def __init__(self, config: ServiceConfig, interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                 quiet_methods: tuple[str, ...] = (), max_receive_message_bytes: int = MAX_MESSAGE_BYTES,
                 handle_signals: bool = True) -> None:
        """`quiet_methods`: full method names ("/mocap.v1.ResourceService/Acquire") logged only
        when they fail (high-rate calls); they are still measured. `max_receive_message_bytes`:
        the transport's limit on one received message (see SERVER_OPTIONS). `handle_signals`:
        whether the `async with` takes SIGTERM/SIGINT as the stop request (off for a host
        embedded in another program, such as a test)."""
        self.config = config
        options = tuple((k, max_receive_message_bytes if k == "grpc.max_receive_message_length" else v)
                        for k, v in SERVER_OPTIONS)
        self.server = grpc.aio.server(interceptors=(ServerInterceptor(quiet_methods), *interceptors),
                                      options=options)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._handle_signals = handle_signals
        self._service_names: list[str] = []
        self._stopping_hooks: list[tuple[str, ShutdownCallback]] = []
        self._release_steps: list[tuple[str, ShutdownCallback]] = []
        self._stop_requested = asyncio.Event()
        self._started = False
        self._stopped = False
        self._body: asyncio.Task[Any] | None = None  # the task inside `async with`, while it builds
        self._waiting = False  # inside serve_until_stopped(): a signal only has to wake it
        self._cancelled_by_signal = False
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None

    def add_servicer(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: Any,
                     pb2_module: ModuleType, service: str) -> None:
        """Registers a servicer (before `start()`); `service` is its name in `pb2_module` (for
        health and reflection)."""
        if self._started:
            raise RuntimeError("servicers are registered before the server starts")
        add_fn(servicer, self.server)
        self._service_names.append(pb2_module.DESCRIPTOR.services_by_name[service].full_name)

    def on_stopping(self, hook: ShutdownCallback, name: str | None = None) -> None:
        """Registers a hook run when the stop begins, before in-flight calls drain (end long
        waits and streams so they do not hold the grace period); hooks run in registration
        order, each even if an earlier one fails."""
        self._stopping_hooks.append((_step_name(hook, name), hook))

    def on_release(self, step: ShutdownCallback, name: str | None = None) -> None:
        """Registers a release step, run after the drain; steps run in reverse order of
        registration, each even if an earlier one fails."""
        self._release_steps.append((_step_name(step, name), step))

    on_shutdown = on_release  # the former name

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def __aenter__(self) -> ServiceHost:
        if self._handle_signals:
            self._body = asyncio.current_task()
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        ours = exc_type is not None and issubclass(exc_type, asyncio.CancelledError) and self._cancelled_by_signal
        if ours and self._body is not None:
            self._body.uncancel()
        failed = exc_type is not None and not ours
        try:
            await self.stop(0 if failed else None)
        finally:
            self._body = None
            if self._handle_signals:
                loop = asyncio.get_running_loop()
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
        return ours  # a signal's cancellation of start-up is a stop, not an error

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_requested.is_set():
            return
        log.info("stop requested", signal=sig.name)
        self._stop_requested.set()
        if not self._waiting and self._body is not None:  # still starting: stop it where it waits
            self._cancelled_by_signal = True
            self._body.cancel()

    def request_stop(self) -> None:
        """Makes `serve_until_stopped()` return (as SIGTERM does)."""
        self._stop_requested.set()

    async def start(self) -> None:
        """Binds the port and starts serving; health reports NOT_SERVING until set_serving().
        Does nothing when already started."""
        if self._started:
            return
        self._started = True
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
            self.on_release(self._metrics_server.shutdown, "metrics-http")
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

    async def serve_until_stopped(self) -> None:
        """Listens (if `start()` has not), reports SERVING and returns at SIGTERM/SIGINT or
        `request_stop()`; leaving the `async with` then stops gracefully."""
        await self.start()
        if self._stop_requested.is_set():  # asked to stop while starting: never report SERVING
            return
        await self.set_serving()
        self._waiting = True
        try:
            await self._stop_requested.wait()
        finally:
            self._waiting = False

    async def stop(self, grace: float | None = None) -> None:
        """Runs the stopping hooks, stops accepting calls, drains in-flight ones for the grace
        period (default `grace_seconds`), then runs the release steps. Only the first call acts."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()  # a later signal has nothing left to do
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down", grace_seconds=grace)
        await run_steps(self._stopping_hooks, "stopping hook")
        await self.health.enter_graceful_shutdown()
        if self._started:
            await self.server.stop(grace)
        await run_release_steps(self._release_steps)
        log.info("stopped")


def _step_name(step: ShutdownCallback, name: str | None) -> str:
    return name or getattr(step, "__qualname__", repr(step))


async def run_steps(steps: list[tuple[str, ShutdownCallback]], what: str = "release step") -> None:
    """Runs `steps` in order; a failing step is logged and the others still run."""
    for name, step in steps:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - one failed step must not skip the others
            log.exception(f"{what} failed", step=name)


async def run_release_steps(steps: list[tuple[str, ShutdownCallback]]) -> None:
    """Runs release steps in reverse order; a failing step is logged and the others still run."""
    await run_steps(list(reversed(steps)))


def run_main(main: Callable[[], Awaitable[None]]) -> None:
    """Entry point helper for `python -m <service>`: runs the service's async main."""
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # Ctrl-C before the host took the signals over
        pass
