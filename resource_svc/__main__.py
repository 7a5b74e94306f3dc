"""`python -m resource_svc [--flags]`: the GPU lease broker (`--help` lists every option).

Ownership: the inventory and the store belong to `build` until the broker exists, then to the
broker (its `close()` releases both, the inventory even if the store fails to close). The
broker's close is a release step of the `ServiceHost`, whose `async with` runs it on every way
out of `main` — after a signal, or when any step fails — releasing the steps in reverse order,
each even if another fails: metrics HTTP server, then the broker (watchers, tasks, queued
commits, store, inventory).
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys

from mocap.v1 import resource_pb2, resource_pb2_grpc
from mocap_common.config import load_config
from mocap_common.logs import configure_logging, get_logger
from mocap_common.server import ServiceHost, run_main
from resource_svc.broker import LeaseBroker
from resource_svc.config import ResourceConfig
from resource_svc.inventory import Inventory, InventoryError, open_inventory
from resource_svc.server import ResourceServicer
from resource_svc.store import SqliteLeaseStore

log = get_logger("resource_svc")

# The lease hot path: logged only when a call fails, unless --log-lease-rpcs.
HOT_METHODS = tuple(f"/mocap.v1.ResourceService/{m}" for m in ("Acquire", "Release", "Renew", "KeepAlive",
                                                                   "ValidateLease"))


async def main() -> None:
    config = load_config(ResourceConfig, sys.argv[1:])
    configure_logging(config.service_name, config.log_level, config.log_format)
    async with ServiceHost(config, quiet_methods=() if config.log_lease_rpcs else HOT_METHODS) as host:
        await build(config, host)
        await host.serve_until_stopped()


async def build(config: ResourceConfig, host: ServiceHost) -> None:
    """The broker on its inventory and lease table, served by `host`; SystemExit when either
    cannot be opened."""
    inventory = _open_inventory(config)  # nothing is held if this fails
    broker = await _open_broker(config, inventory, host)
    servicer = ResourceServicer(broker)
    # Waiting Acquires, watches and keep-alive streams end when the stop begins (UNAVAILABLE:
    # retry elsewhere or later) instead of holding the shutdown for the whole grace period.
    host.on_stopping(broker.stop_accepting, "broker-intake")
    host.on_stopping(servicer.stop_accepting, "servicer-streams")
    host.add_servicer(resource_pb2_grpc.add_ResourceServiceServicer_to_server, servicer, resource_pb2,
                      "ResourceService")
    await host.start()
    log.info("serving devices", devices=[spec.id for spec in inventory.specs()], db_path=str(config.db_path))


def _open_inventory(config: ResourceConfig) -> Inventory:
    try:
        return open_inventory(config.inventory, config.cpu_devices)
    except (InventoryError, ValueError) as exc:
        raise SystemExit(f"resource_svc: {exc}") from None


async def _open_broker(config: ResourceConfig, inventory: Inventory, host: ServiceHost) -> LeaseBroker:
    """The broker on `inventory` (taken over: closed here if no broker comes of it) and its store,
    with the lease table restored before anyone can call; leaving the host closes it."""
    with contextlib.ExitStack() as until_owned:
        until_owned.callback(inventory.close)
        try:
            store = SqliteLeaseStore(config.db_path, synchronous=config.sqlite_synchronous,
                                     events_kept=config.events_kept, ended_kept=config.ended_leases_kept)
            until_owned.callback(store.close)
            broker = LeaseBroker(store, inventory, config.broker_config())
        except (sqlite3.Error, OSError, ValueError) as exc:
            raise _cannot_open(config, exc) from None
        until_owned.pop_all()  # the broker owns both from here: its close() releases them
    host.on_release(broker.close, "lease-broker")
    try:
        await broker.start()
    except (sqlite3.Error, OSError, ValueError) as exc:
        raise _cannot_open(config, exc) from None
    return broker


def _cannot_open(config: ResourceConfig, exc: Exception) -> SystemExit:
    return SystemExit(f"resource_svc: cannot open the lease table {config.db_path}: {exc}")


if __name__ == "__main__":
    run_main(main)
