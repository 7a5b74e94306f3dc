"""`python -m exporter_svc [--port 50054] [--blender-timeout-s 300] ...` — the exporter service."""

from __future__ import annotations

import importlib.util
import sys

from exporter_svc.config import ExporterConfig
from exporter_svc.export import Exporter
from exporter_svc.server import ExporterServicer
from exporter_svc.workspace import sweep_orphans
from mocap.v1 import exporter_pb2, exporter_pb2_grpc
from mocap_common.config import load_config
from mocap_common.logs import configure_logging, get_logger
from mocap_common.server import ServiceHost, run_main

log = get_logger("exporter_svc")


async def main() -> None:
    config = load_config(ExporterConfig, sys.argv[1:])
    configure_logging(config.service_name, config.log_level, config.log_format)
    async with ServiceHost(config) as host:
        await build(config, host)
        await host.serve_until_stopped()


async def build(config: ExporterConfig, host: ServiceHost) -> None:
    """The exporter on `host`, its work directory swept of what a dead exporter left."""
    exporter = Exporter(python=config.blender_interpreter(), blender_timeout_s=config.blender_timeout_s,
                        max_blender=config.max_concurrent_blender)
    servicer = ExporterServicer(exporter, config)
    host.add_servicer(exporter_pb2_grpc.add_ExporterServiceServicer_to_server, servicer, exporter_pb2, "ExporterService")
    await host.start()
    config.work_dir.mkdir(parents=True, exist_ok=True)
    # Synchronous on purpose, although killing a leftover Blender waits for it: with the event
    # loop blocked no call can create its directory while the sweep is deleting directories.
    sweep_orphans(config.work_dir)
    if not config.blender_python and importlib.util.find_spec("bpy") is None:
        # BVH still works; FBX/GLB calls fail with BLENDER_FAILED. Serve anyway, loudly.
        log.error("bpy is not installed: FBX and GLB exports will fail (pip install '.[exporter]')")
    # The preview renderer pulls in PyAV and the shared overlay renderer: pay that import once
    # here, before reporting SERVING, not in the first call that asks for a preview. It also
    # proves at start that the exporter's own extra is enough (services never import each other).
    import exporter_svc.preview  # noqa: F401, PLC0415


if __name__ == "__main__":
    run_main(main)
