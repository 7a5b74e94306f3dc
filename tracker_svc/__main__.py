"""`python -m tracker_svc [--flags]`: the tracker service (`--help` lists every option).

Serves TrackerService with health, reflection and metrics; health turns SERVING once the
BlazePose models are verified and loaded. Each call holds an inference lease from the broker at
MOCAP_RESOURCE_ADDR; on shutdown the calls are stopped and their leases released.

`python -m tracker_svc track VIDEO --out FILE ...` is the debug command instead (tracker_svc.cli,
also `python -m tracker_svc.cli track ...`; the user CLI's `mocap track` runs it).

The package's __init__ sets OMP_WAIT_POLICY before torch loads, which `-m` runs first.
"""

from __future__ import annotations

import asyncio
import sys

import torch

from mocap_common.config import load_config
from mocap_common.logs import configure_logging, get_logger
from mocap_common.server import ServiceHost, run_main
from tracker_svc.config import TrackerServiceConfig
from tracker_svc.errors import ModelsMissingError
from tracker_svc.model_setup import model_paths
from tracker_svc.pipeline import TrackerConfig
from tracker_svc.server import TrackerServicer, add_to
from tracker_svc.service import TrackingService, TrackingSettings

log = get_logger("tracker_svc")


async def main(argv: list[str]) -> None:
    config = load_config(TrackerServiceConfig, argv)
    configure_logging(config.service_name, config.log_level, config.log_format)
    async with ServiceHost(config) as host:
        await build(config, host)
        await host.serve_until_stopped()


async def build(config: TrackerServiceConfig, host: ServiceHost) -> None:
    """The tracking service on `host`, its models loaded; SystemExit when they are missing."""
    torch.set_num_threads(max(1, config.torch_threads))
    settings = TrackingSettings(
        resource_addr=config.resource_addr, device=config.device, lease_ttl_s=config.lease_ttl_s,
        acquire_timeout_s=config.acquire_timeout_s, max_concurrent_calls=config.max_concurrent_calls,
        spool_dir=config.spool_dir, pipeline=TrackerConfig(batch_size=config.batch_size),
    )
    try:
        models = model_paths(config.model_dir)
    except ModelsMissingError as error:
        raise SystemExit(f"tracker: {error}") from None
    service = TrackingService(settings, models)
    add_to(host, TrackerServicer(service, config.default_max_persons))
    host.on_release(service.close, "track-calls")  # stops every call; each releases its lease
    await host.start()  # health says NOT_SERVING while the models load
    await asyncio.to_thread(service.load, "cpu")
    log.info("models loaded", detector=str(models.detector), landmark=str(models.landmark))


if __name__ == "__main__":
    if sys.argv[1:2] == ["track"]:
        from tracker_svc.cli import main as track_command  # noqa: PLC0415 - the debug command only

        sys.exit(track_command(sys.argv[1:]))
    run_main(lambda: main(sys.argv[1:]))
