"""The gateway assembled: store, event hub, uploads, pipeline, orchestrator, retention and the
gRPC server, started in order and stopped in reverse.

    start: open the store → startup sweep → listen (NOT_SERVING) → queue jobs, start workers and
           retention → SERVING
    stop:  end watch streams → stop accepting calls, drain in-flight ones (grace period) →
           retention → running jobs end FAILED (INTERRUPTED) → uploads settle (kept for resume)
           → stage channels → store
"""

from __future__ import annotations

import asyncio
import signal

from gateway.config import GatewayConfig
from gateway.events import EventHub
from gateway.orchestrator import Orchestrator
from gateway.pipeline import EXPORT, SMOOTH, TRACK, Pipeline, StagePolicy
from gateway.retention import Retention
from gateway.server import GatewayServicer
from gateway.service import JobService
from gateway.stages import GrpcStages
from gateway.store import SqliteJobStore
from gateway.tenancy import Tenancy
from gateway.uploads import TRANSPORT_RECEIVE_LIMIT_BYTES, Uploads
from mocap.v1 import gateway_pb2, gateway_pb2_grpc
from mocap_common.logs import get_logger
from mocap_common.server import ServiceHost

log = get_logger(__name__)


def stage_policy(config: GatewayConfig) -> StagePolicy:
    return StagePolicy(
        timeout_s={TRACK: config.track_timeout_s, SMOOTH: config.smooth_timeout_s, EXPORT: config.export_timeout_s},
        concurrency={TRACK: config.track_concurrency, SMOOTH: config.smooth_concurrency, EXPORT: config.export_concurrency},
        job_timeout_s=config.job_timeout_s,
        attempts=max(1, config.stage_attempts),
        backoff_s=config.stage_retry_backoff_s,
        backoff_max_s=max(config.stage_retry_backoff_s, config.stage_retry_backoff_max_s),
        retry_budget_s={TRACK: config.track_retry_budget_s, SMOOTH: config.smooth_retry_budget_s,
                        EXPORT: config.export_retry_budget_s},
        addresses={TRACK: config.tracker_addr, SMOOTH: config.smoother_addr, EXPORT: config.exporter_addr},
    )


class Gateway:
    """A running gateway. `await Gateway.start(config)`, then `await gateway.stop()`."""

    def __init__(self, config: GatewayConfig, host: ServiceHost, hub: EventHub) -> None:
        self.config = config
        self.host = host
        self._hub = hub

    @property
    def port(self) -> int:
        return self.host.port

    @classmethod
    async def start(cls, config: GatewayConfig) -> "Gateway":
        tenancy = Tenancy.from_file(config.tokens_file)
        hub = EventHub()
        store = SqliteJobStore(config.db_path, job_retention_s=config.job_retention_s, on_event=hub.notify)
        # Above the documented chunk limit, so an oversized chunk reaches CreateJob and is refused
        # with CHUNK_TOO_LARGE instead of gRPC's bare RESOURCE_EXHAUSTED (gateway.uploads).
        host = ServiceHost(config, max_receive_message_bytes=TRANSPORT_RECEIVE_LIMIT_BYTES)
        host.on_shutdown(store.close, "job-store")
        try:
            stages = GrpcStages(config)
            host.on_shutdown(stages.close, "stage-channels")
            orchestrator = Orchestrator(store, config.max_running_jobs)
            pipeline = Pipeline(store, stages, config.jobs_dir, stage_policy(config), orchestrator.cancelled_as)
            uploads = Uploads(config, store, orchestrator.enqueue)
            host.on_shutdown(uploads.drain, "uploads")
            retention = Retention(config, store, uploads.is_live)
            retention.startup_sweep()
            host.on_shutdown(orchestrator.stop, "running-jobs")
            host.on_shutdown(retention.stop, "retention")
            service = JobService(store, hub, uploads, orchestrator, config.jobs_dir)
            host.add_servicer(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, GatewayServicer(service, tenancy),
                              gateway_pb2, "GatewayService")
            await host.start()
            orchestrator.start(pipeline)
            retention.start()
        except BaseException:
            await host.stop(0)
            raise
        await host.set_serving()
        log.info("gateway ready", data_dir=str(config.data_dir), open_mode=tenancy.open_mode)
        return cls(config, host, hub)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: watchers are told to reconnect, in-flight calls drain, everything is released."""
        self._hub.close()
        await self.host.stop(grace)

    async def serve_until_signalled(self) -> None:
        """Serves until SIGTERM or SIGINT, then stops gracefully."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await self.stop()
