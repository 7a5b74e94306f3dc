"""The gateway assembled: store, event hub, uploads, pipeline, orchestrator, retention and the
gRPC server, started in order and stopped in reverse by its `ServiceHost` (`build`).

    start: open the store (SQLite, or PostgreSQL when database_url is set; migrated) → startup sweep → listen (NOT_SERVING) → queue jobs, start workers and
           retention → SERVING
    stop:  end watch streams → stop accepting calls, drain in-flight ones (grace period) →
           retention → running jobs handed back (claims released: another replica, or the next
           start, resumes them) → uploads settle (kept for resume) → stage channels → store

`python -m gateway` runs it (gateway/__main__.py); `Gateway.start(config)` runs the same
assembly in another program's event loop (the tests).
"""

from __future__ import annotations

import contextlib

from gateway.config import GatewayConfig
from gateway.events import EventHub
from gateway.orchestrator import ClaimPolicy, Orchestrator
from gateway.pipeline import EXPORT, SMOOTH, TRACK, Pipeline, StagePolicy
from gateway.retention import Retention
from gateway.server import GatewayServicer
from gateway.service import JobService
from gateway.stages import GrpcStages
from gateway.store import open_job_store
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


def new_host(config: GatewayConfig, handle_signals: bool = True) -> ServiceHost:
    # Above the documented chunk limit, so an oversized chunk reaches CreateJob and is refused
    # with CHUNK_TOO_LARGE instead of gRPC's bare RESOURCE_EXHAUSTED (gateway.uploads).
    return ServiceHost(config, max_receive_message_bytes=TRANSPORT_RECEIVE_LIMIT_BYTES, handle_signals=handle_signals)


async def build(config: GatewayConfig, host: ServiceHost) -> None:
    """Assembles the gateway on `host` and starts its workers; SystemExit for a bad tokens file."""
    tenancy = Tenancy.from_file(config.tokens_file)  # refused before anything is opened
    hub = EventHub()
    store = await open_job_store(config.database_url, config.db_path, job_retention_s=config.job_retention_s,
                                 on_event=hub.notify)
    host.on_release(store.close, "job-store")
    host.on_stopping(hub.close, "watch-streams")  # watchers are told to reconnect, not held for the grace
    stages = GrpcStages(config)
    host.on_release(stages.close, "stage-channels")
    replica = config.replica_name
    orchestrator = Orchestrator(store, config.max_running_jobs, ClaimPolicy(
        owner=replica, ttl_s=config.job_claim_ttl_s, poll_s=config.job_poll_s, max_claims=config.max_job_claims))
    pipeline = Pipeline(store, stages, config.jobs_dir, stage_policy(config), orchestrator.outcome)
    uploads = Uploads(config, store, orchestrator.enqueue, owner=replica, stream_ttl_s=config.job_claim_ttl_s)
    host.on_release(uploads.drain, "uploads")
    # One gateway per SQLite file, so what it finds claimed at startup was claimed by itself, before.
    retention = Retention(config, store, uploads.is_live, exclusive=not config.database_url)
    await retention.startup_sweep()
    host.on_release(orchestrator.stop, "running-jobs")
    host.on_release(retention.stop, "retention")
    service = JobService(store, hub, uploads, orchestrator, config.jobs_dir)
    host.add_servicer(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, GatewayServicer(service, tenancy),
                      gateway_pb2, "GatewayService")
    await host.start()
    uploads.start()
    orchestrator.start(pipeline)
    retention.start()
    log.info("gateway ready", data_dir=str(config.data_dir), open_mode=tenancy.open_mode, replica=replica,
             job_store="postgresql" if config.database_url else "sqlite")


class Gateway:
    """A gateway inside another program's event loop: `await Gateway.start(config)`, then
    `await gateway.stop()`. It takes no signals; `python -m gateway` is the process's own."""

    def __init__(self, config: GatewayConfig, host: ServiceHost) -> None:
        self.config = config
        self.host = host

    @property
    def port(self) -> int:
        return self.host.port

    @classmethod
    async def start(cls, config: GatewayConfig) -> "Gateway":
        """Builds and serves a gateway; what a failed start opened is released before it raises."""
        async with contextlib.AsyncExitStack() as until_started:
            host = await until_started.enter_async_context(new_host(config, handle_signals=False))
            await build(config, host)
            await host.set_serving()
            until_started.pop_all()  # running: stop() releases it from here
        return cls(config, host)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: watchers are told to reconnect, in-flight calls drain, everything is released."""
        await self.host.stop(grace)
