"""`python -m resource_svc [--flags]`: the GPU lease broker (`--help` lists every option)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys

from mocap.v1 import resource_pb2, resource_pb2_grpc
from mocap_common.config import load_config
from mocap_common.logs import configure_logging, get_logger
from mocap_common.server import ServiceHost, run_main
from resource_svc.broker import LeaseBroker
from resource_svc.config import ResourceConfig
from resource_svc.inventory import InventoryError, open_inventory
from resource_svc.server import ResourceServicer
from resource_svc.store import SqliteLeaseStore

log = get_logger("resource_svc")

# The lease hot path: logged only when a call fails, unless --log-lease-rpcs.
HOT_METHODS = tuple(f"/mocap.v1.ResourceService/{m}" for m in ("Acquire", "Release", "Renew", "KeepAlive",
                                                                   "ValidateLease"))


async def main() -> None:
    config = load_config(ResourceConfig, sys.argv[1:])
    configure_logging(config.service_name, config.log_level, config.log_format)
    try:
        inventory = open_inventory(config.inventory, config.cpu_devices)
    except (InventoryError, ValueError) as exc:
        raise SystemExit(f"resource_svc: {exc}") from None
    try:
        store = SqliteLeaseStore(config.db_path, synchronous=config.sqlite_synchronous,
                                 events_kept=config.events_kept, ended_kept=config.ended_leases_kept)
        broker = LeaseBroker(store, inventory, config.broker_config())
        await broker.start()  # restores the lease table before anyone can call
    except (sqlite3.Error, OSError, ValueError) as exc:
        inventory.close()
        raise SystemExit(f"resource_svc: cannot open the lease table {config.db_path}: {exc}") from None
    servicer = ResourceServicer(broker)
    host = ServiceHost(config, quiet_methods=() if config.log_lease_rpcs else HOT_METHODS)
    host.add_servicer(resource_pb2_grpc.add_ResourceServiceServicer_to_server, servicer, resource_pb2,
                      "ResourceService")
    host.on_shutdown(broker.close, "lease-broker")
    await host.start()
    log.info("serving devices", devices=[spec.id for spec in inventory.specs()], db_path=str(config.db_path))
    await host.set_serving()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Waiting Acquires, watches and keep-alive streams end now (UNAVAILABLE: retry elsewhere or
    # later) instead of holding the shutdown for the whole grace period.
    broker.stop_accepting()
    servicer.stop_accepting()
    await host.stop()


if __name__ == "__main__":
    run_main(main)
