"""`lease` — run a command under a GPU lease, and look at the broker.

    lease run --kind training [--device SEL] [--ttl S] [--priority N] [--wait S] -- CMD ARGS...
    lease devices [--json]
    lease list [--state active] [--device gpu:0] [--limit N] [--json]
    lease watch [--after-seq N | --all] [--json]

`lease run` acquires a slot (waiting for one), sets CUDA_VISIBLE_DEVICES to the leased GPU (empty
for a CPU device), runs CMD in its own process group, keeps the lease alive, and releases it when
CMD exits; it exits with CMD's status. SIGINT/SIGTERM are forwarded to CMD's group. If the lease
is lost, CMD's whole group is terminated (SIGTERM, then SIGKILL after --kill-grace) and `lease`
exits with 75. If `lease run` itself dies (kill -9), CMD's whole group is killed with it
(`mocap_common.procs.child_process`): no command runs on without its lease. The broker address
comes from --addr, else $MOCAP_RESOURCE_ADDR, else 127.0.0.1:50055.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from mocap.v1 import resource_pb2
from mocap_common.errors import ServiceError
from mocap_common.lease_client import LeaseClient, LeaseLost, default_address
from mocap_common.logs import configure_logging
from mocap_common.procs import child_process, kill_group

EXIT_USAGE = 64  # the broker refused the request as asked (bad argument, no such device)
EXIT_UNAVAILABLE = 69  # the broker could not be reached or is shutting down
EXIT_SOFTWARE = 70  # any other broker error
EXIT_NO_SLOT = 73  # no slot became free within --wait
EXIT_LEASE_LOST = 75  # the lease was lost while CMD ran; CMD's process group was killed
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130  # interrupted while waiting for a slot

EPILOG = f"""exit codes: CMD's own status (128+N if a signal N ended it); {EXIT_LEASE_LOST} lease lost (CMD's
group killed); {EXIT_NO_SLOT} no slot within --wait; {EXIT_UNAVAILABLE} broker unreachable; {EXIT_USAGE} request
refused (bad argument, no such device); {EXIT_SOFTWARE} other broker error; {EXIT_CANNOT_EXECUTE}/{EXIT_NOT_FOUND} CMD not
executable/not found; {EXIT_INTERRUPTED} interrupted while waiting."""

_STATES = {"active": resource_pb2.LEASE_STATE_ACTIVE, "released": resource_pb2.LEASE_STATE_RELEASED,
           "reclaimed": resource_pb2.LEASE_STATE_RECLAIMED}

err = Console(stderr=True, highlight=False, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lease", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default=None, help="broker address HOST:PORT [env MOCAP_RESOURCE_ADDR, "
                                                     "default 127.0.0.1:50055]")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the lease client's steps on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a command under a lease", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--kind", choices=("training", "inference"), required=True, help="kind of slot")
    run.add_argument("--device", default="any", help="any (default), an index, an NVML UUID, or a device id "
                                                     "such as gpu:1 or cpu:0")
    run.add_argument("--min-free-memory", type=int, default=0, metavar="BYTES",
                     help="only devices with at least this much free memory")
    run.add_argument("--ttl", type=float, default=30.0, metavar="S", help="lease TTL, 1..3600 s (default 30)")
    run.add_argument("--priority", type=int, default=0, help="-100..100, higher is served first (default 0)")
    run.add_argument("--wait", type=float, default=None, metavar="S",
                     help="give up if no slot frees within S seconds (default: wait as long as it takes)")
    run.add_argument("--job", default=None, help="job name recorded with the lease (default: the command)")
    run.add_argument("--kill-grace", type=float, default=2.0, metavar="S",
                     help="after a lease loss, seconds between SIGTERM and SIGKILL to CMD's group (default 2)")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")

    devices = commands.add_parser("devices", help="devices, live figures and slot occupancy")
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")

    listing = commands.add_parser("list", help="leases, newest first")
    listing.add_argument("--state", choices=tuple(_STATES), default=None, help="only leases in this state")
    listing.add_argument("--device", default="", help="only leases on this device id, e.g. gpu:0")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    watch = commands.add_parser("watch", help="follow lease events (Ctrl-C stops); default: from now on")
    start = watch.add_mutually_exclusive_group()
    start.add_argument("--after-seq", type=int, default=None, metavar="N",
                       help="replay the kept history after event N, then follow")
    start.add_argument("--all", action="store_true", help="replay the whole kept history, then follow")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("lease", "info" if args.verbose else "error", "console")
    address = args.addr or default_address()
    handler = {"run": _run, "devices": _devices, "list": _list, "watch": _watch}[args.command]
    try:
        return asyncio.run(handler(args, address))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lease watch | head`: the reader is done
        sys.stderr.close()
        return 0
    except ServiceError as error:
        return _report(error, address)


def _report(error: ServiceError, address: str) -> int:
    if error.code == "UNAVAILABLE":
        err.print(f"lease: the broker at {address} is unavailable: {error.message}")
        return EXIT_UNAVAILABLE
    if error.reason == "NO_SLOT":
        err.print(f"lease: no slot became free in time: {error.message}")
        return EXIT_NO_SLOT
    err.print(f"lease: the broker refused: {error.code} [{error.reason}] {error.message}")
    for violation in error.violations:
        err.print(f"  - {violation.field}: {violation.description}")
    return EXIT_USAGE if error.code in ("INVALID_ARGUMENT", "NOT_FOUND") else EXIT_SOFTWARE


# -- lease run -------------------------------------------------------------------------------

async def _run(args: argparse.Namespace, address: str) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        err.print("lease run: no command given (lease run --kind KIND -- CMD ARGS...)")
        return 2
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    child_pgid: list[int] = []
    interrupted: list[int] = []

    def on_signal(signum: int) -> None:
        if child_pgid:
            kill_group(child_pgid[0], signum)  # CMD decides what the signal means; we wait for it
        else:
            interrupted.append(signum)
            main_task.cancel()  # still waiting for a slot: give up

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    job = args.job if args.job is not None else shlex.join(argv)[:200]
    async with LeaseClient(address) as client:
        try:
            async with client.hold(kind=args.kind, holder_service="lease-run", job=job, device=args.device,
                                   ttl_s=args.ttl, priority=args.priority, acquire_timeout_s=args.wait,
                                   min_free_memory_bytes=args.min_free_memory) as held:
                env = dict(os.environ)
                env["CUDA_VISIBLE_DEVICES"] = str(held.device_index) if held.device_index >= 0 else ""
                env["MOCAP_LEASE_NAME"] = held.name
                env["MOCAP_LEASE_FENCING_TOKEN"] = str(held.fencing_token)
                env["MOCAP_LEASE_DEVICE"] = held.device
                try:
                    async with child_process(argv, env=env, stdin=None,
                                             grace_s=args.kill_grace) as proc:
                        child_pgid.append(proc.pid)
                        returncode = await proc.wait()
                except FileNotFoundError:
                    err.print(f"lease run: command not found: {argv[0]}")
                    return EXIT_NOT_FOUND
                except PermissionError:
                    err.print(f"lease run: command not executable: {argv[0]}")
                    return EXIT_CANNOT_EXECUTE
        except LeaseLost as lost:
            group = f" (process group {child_pgid[0]})" if child_pgid else ""
            err.print(f"lease run: {lost}; killed {shlex.join(argv)}{group}")
            return EXIT_LEASE_LOST
        except asyncio.CancelledError:
            if interrupted:
                err.print("lease run: interrupted while waiting for a slot")
                return 128 + interrupted[0]
            raise
    return returncode if returncode >= 0 else 128 - returncode


# -- lease devices / list / watch --------------------------------------------------------------

async def _devices(args: argparse.Namespace, address: str) -> int:
    async with LeaseClient(address) as client:
        devices = await client.list_devices()
    if args.json:
        print(json.dumps([_as_dict(d) for d in devices], indent=2))
        return 0
    table = Table(title=f"devices at {address}")
    for column in ("device", "name", "memory used / total", "util", "training", "inference", "processes"):
        table.add_column(column)
    for device in devices:
        slots = {s.kind: s for s in device.slots}
        memory = (f"{_gib(device.memory_used_bytes)} / {_gib(device.memory_total_bytes)}"
                  if device.memory_total_bytes else "-")
        processes = ", ".join(f"{p.pid}{' (UNLEASED)' if p.unleased else ''}" for p in device.processes) or "-"
        table.add_row(device.id, device.name, memory,
                      f"{device.utilization_percent}%" if device.kind == resource_pb2.DEVICE_KIND_GPU else "-",
                      _slot_text(slots.get(resource_pb2.SLOT_KIND_TRAINING)),
                      _slot_text(slots.get(resource_pb2.SLOT_KIND_INFERENCE)), processes)
    _out().print(table)
    return 0


async def _list(args: argparse.Namespace, address: str) -> int:
    state = _STATES[args.state] if args.state else resource_pb2.LEASE_STATE_UNSPECIFIED
    async with LeaseClient(address) as client:
        leases = await client.list_leases(state=state, device=args.device, limit=max(1, args.limit))
    if args.json:
        print(json.dumps([_as_dict(lease) for lease in leases], indent=2))
        return 0
    table = Table(title=f"leases at {address}, newest first")
    for column in ("lease", "state", "device", "kind/slot", "token", "holder", "granted", "expires / ended"):
        table.add_column(column)
    now = time.time()
    for lease in leases:
        ends = lease.expire_time.seconds + lease.expire_time.nanos / 1e9
        ends_text = f"in {ends - now:.1f} s" if lease.state == resource_pb2.LEASE_STATE_ACTIVE else _clock(ends)
        table.add_row(lease.name, _state_name(lease.state), lease.device,
                      f"{_kind_name(lease.kind)}/{lease.slot}", str(lease.fencing_token), _holder_text(lease.holder),
                      _clock(lease.grant_time.seconds + lease.grant_time.nanos / 1e9), ends_text)
    _out().print(table)
    return 0


async def _watch(args: argparse.Namespace, address: str) -> int:
    console = _out()
    async with LeaseClient(address) as client:
        after_seq = 0 if args.all or args.after_seq is None else args.after_seq
        live_only = not args.all and args.after_seq is None
        async for event in client.watch(after_seq, live_only=live_only):
            if args.json:
                print(json.dumps(_as_dict(event)), flush=True)
                continue
            when = _clock(event.time.seconds + event.time.nanos / 1e9)
            kind = resource_pb2.LeaseEventType.Name(event.type).removeprefix("LEASE_EVENT_TYPE_")
            if event.HasField("lease"):
                lease = event.lease
                console.print(f"{event.seq:>8}  {when}  {kind:<13} {lease.name}  {lease.device} "
                              f"{_kind_name(lease.kind)}/{lease.slot}  token {lease.fencing_token}  "
                              f"{_holder_text(lease.holder)}", soft_wrap=True)
            else:
                console.print(f"{event.seq:>8}  {when}  {kind:<13} {event.device}  pid {event.process.pid} holds "
                              f"{_gib(event.process.used_memory_bytes)} with no lease", soft_wrap=True)
    return 0


def _out() -> Console:
    """stdout; wide when it is not a terminal, so piped tables are not squeezed to 80 columns."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _as_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def _slot_text(usage: resource_pb2.SlotUsage | None) -> str:
    if usage is None:
        return "-"
    return f"{usage.used}/{usage.total}" + (f" ({usage.waiting} waiting)" if usage.waiting else "")


def _state_name(state: int) -> str:
    return resource_pb2.LeaseState.Name(state).removeprefix("LEASE_STATE_").lower()


def _kind_name(kind: int) -> str:
    return resource_pb2.SlotKind.Name(kind).removeprefix("SLOT_KIND_").lower()


def _holder_text(holder: resource_pb2.Holder) -> str:
    text = f"{holder.service or '?'} pid {holder.pid}@{holder.host or '?'}"
    return text + (f" {holder.job}" if holder.job else "")


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%H:%M:%S.%f")[:-3] + "Z"


if __name__ == "__main__":
    sys.exit(main())
