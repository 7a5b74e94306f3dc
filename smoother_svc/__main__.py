"""`python -m smoother_svc [--port 50053 ...]`: the smoother service.

Serves SmootherService (Smooth, SmoothStream, Train, ListCheckpoints) with health, reflection and
metrics. Health turns SERVING once the noise model is read and the checkpoint directory scanned
(the newest checkpoint, if any, is loaded). Training runs go through the resource broker at
MOCAP_RESOURCE_ADDR; on shutdown they are stopped and their leases released.
"""

from __future__ import annotations

import asyncio
import sys

from mocap_common.config import load_config
from mocap_common.logs import configure_logging, get_logger
from mocap_common.server import ServiceHost, run_main
from smoother_svc import server
from smoother_svc.checkpoints import CheckpointStore
from smoother_svc.config import SmootherConfig
from smoother_svc.noise import load_noise_model
from smoother_svc.trainer import ServedModel, Trainer, TrainerSettings, torch_threads

log = get_logger("smoother_svc")


async def main() -> None:
    config = load_config(SmootherConfig, sys.argv[1:])
    configure_logging(config.service_name, config.log_level, config.log_format)
    async with ServiceHost(config) as host:
        await build(config, host)
        await host.serve_until_stopped()


async def build(config: SmootherConfig, host: ServiceHost) -> None:
    """The smoother and its trainer on `host`, the newest checkpoint (if any) loaded."""
    torch_threads(config.torch_threads)
    store = CheckpointStore(config.checkpoint_dir)
    served = ServedModel(store)
    trainer = Trainer(
        TrainerSettings(resource_addr=config.resource_addr, mocap_dir=config.mocap_dir,
                        lease_ttl_s=config.lease_ttl_s, acquire_timeout_s=config.lease_acquire_timeout_s),
        store, served, load_noise_model(config.noise_model_path),
    )
    servicer = server.SmootherServicer(config, store, served, trainer)
    server.add_to(host, servicer)
    host.on_release(servicer.close, "smooth-pool")
    host.on_release(trainer.close, "training-runs")  # runs first: stop training, release leases
    await host.start()
    newest = await asyncio.to_thread(served.get)
    log.info("ready", checkpoint=newest.version if newest else None, checkpoint_dir=str(config.checkpoint_dir))


if __name__ == "__main__":
    run_main(main)
