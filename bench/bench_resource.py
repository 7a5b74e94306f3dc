"""Lease broker benchmark: cycles/s (Acquire + Release) and Acquire latency at 1, 16 and 64
concurrent clients, and reclaim precision (deadline → revoke).

The broker runs as its own process (`python -m resource_svc`, SQLite with synchronous=FULL and
group commit, the default config except for enough CPU slots that 64 clients never queue — this
measures the broker's overhead, not waiting). The clients are grpc.aio coroutines in this process,
on plain channels (no client interceptors), 16 clients per channel.

    python -m bench.bench_resource [--seconds 5] [--log-level info] [--levels 1,16,64] [--profile F]

It also measures the transport's ceiling on the machine: the same clients against a bare grpc.aio
server that does nothing, two calls per cycle.

Goal (issue 3): >= 2000 cycles/s with p99 Acquire <= 10 ms at 64 clients, on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import bare_server, free_port, write_result
from mocap.v1 import resource_pb2, resource_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
GOAL_CYCLES_PER_S = 2000.0
GOAL_P99_MS = 10.0
CLIENTS_PER_CHANNEL = 16


class Broker:
    """The broker as a child process in its own process group."""

    def __init__(self, workdir: Path, log_level: str, extra: list[str]) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "broker.log"
        argv = [sys.executable, "-m", "resource_svc", "--port", str(self.port), "--metrics-port", "0",
                "--db-path", str(workdir / "leases.sqlite3"), "--log-level", log_level,
                "--inventory", "cpu", "--cpu-devices", "4", "--cpu-inference-slots", "16", *extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"broker not serving; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# The transport's own ceiling: a bare grpc.aio server (bench.bare_server: no interceptor, no
# broker, no SQLite) that answers ValidateLease with a constant. Two such calls per cycle, from the
# same clients, show what unary gRPC in Python costs on this machine before the broker does anything.


async def bare_grpc_ceiling(clients: int, seconds: float, warmup_s: float = 1.0) -> dict[str, Any]:
    with bare_server("resource") as (address, server_pid):
        channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, clients // CLIENTS_PER_CHANNEL))]
        stubs = [resource_pb2_grpc.ResourceServiceStub(c) for c in channels]
        request = resource_pb2.ValidateLeaseRequest(name="leases/bench", fencing_token=1)
        loop = asyncio.get_running_loop()
        measure_from = loop.time() + warmup_s
        stop_at = measure_from + seconds
        done = 0
        marks: dict[str, float] = {}
        loop.call_at(measure_from, lambda: marks.update(server=_cpu_seconds(server_pid), client=_cpu_seconds()))

        async def client(index: int) -> None:
            nonlocal done
            stub = stubs[index % len(stubs)]
            while (now := loop.time()) < stop_at:
                await stub.ValidateLease(request, timeout=10)
                await stub.ValidateLease(request, timeout=10)
                if now >= measure_from:
                    done += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
        server_cpu = _cpu_seconds(server_pid) - marks["server"]
        client_cpu = _cpu_seconds() - marks["client"]
        for channel in channels:
            await channel.close()
    return {"clients": clients, "cycles_per_s": done / seconds,
            "server_cpu_us_per_cycle": server_cpu / max(1, done) * 1e6,
            "client_cpu_us_per_cycle": client_cpu / max(1, done) * 1e6}


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one when pid is None), seconds."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cycles(address: str, clients: int, seconds: float, broker_pid: int,
                 warmup_s: float = 1.0, rate: float | None = None) -> dict[str, Any]:
    """`clients` coroutines doing Acquire + Release back to back (closed loop), or, with `rate`,
    starting cycles on a fixed schedule of `rate` cycles/s spread over the clients (open loop:
    latency at a load the broker can carry); figures from after the warm-up."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, (clients + CLIENTS_PER_CHANNEL - 1)
                                                                       // CLIENTS_PER_CHANNEL))]
    stubs = [resource_pb2_grpc.ResourceServiceStub(c) for c in channels]
    acquire_ms: list[float] = []
    release_ms: list[float] = []
    done = 0
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    cpu_marks: dict[str, float] = {}
    run = uuid.uuid4().hex[:12]  # request_ids are unique per run: a reused one would name an ended lease

    def mark_cpu() -> None:
        cpu_marks["broker"] = _cpu_seconds(broker_pid)
        cpu_marks["client"] = _cpu_seconds()

    loop.call_at(measure_from, mark_cpu)

    async def client(index: int) -> None:
        nonlocal done
        stub = stubs[index % len(stubs)]
        holder = resource_pb2.Holder(service="bench", pid=os.getpid(), host=socket.gethostname(), job=f"c{index}")
        ttl = _duration(30)
        n = 0
        while True:
            if rate is not None:  # this client's next slot in the schedule: cycle k*clients + index
                at = start + (n * clients + index) / rate
                if at > loop.time():
                    await asyncio.sleep(at - loop.time())
            now = loop.time()
            if now >= stop_at:
                return
            n += 1
            request = resource_pb2.AcquireRequest(kind=resource_pb2.SLOT_KIND_INFERENCE, holder=holder, ttl=ttl,
                                                  request_id=f"{run}-{index}-{n}")
            try:
                t0 = time.perf_counter()
                lease = await stub.Acquire(request, timeout=10)
                t1 = time.perf_counter()
                await stub.Release(resource_pb2.ReleaseRequest(name=lease.name, fencing_token=lease.fencing_token),
                                   timeout=10)
                t2 = time.perf_counter()
            except grpc.RpcError as error:
                code = error.code().name if error.code() else "UNKNOWN"
                errors[code] = errors.get(code, 0) + 1
                continue
            if now >= measure_from:
                done += 1
                acquire_ms.append((t1 - t0) * 1000)
                release_ms.append((t2 - t1) * 1000)

    await asyncio.gather(*(client(i) for i in range(clients)))
    broker_cpu = _cpu_seconds(broker_pid) - cpu_marks["broker"]
    client_cpu = _cpu_seconds() - cpu_marks["client"]
    for channel in channels:
        await channel.close()
    return {
        "clients": clients,
        "offered_cycles_per_s": rate,
        "seconds": seconds,
        "cycles": done,
        "cycles_per_s": done / seconds,
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "acquire_p50_ms": _percentile(acquire_ms, 50),
        "acquire_p99_ms": _percentile(acquire_ms, 99),
        "acquire_max_ms": max(acquire_ms) if acquire_ms else float("nan"),
        "release_p50_ms": _percentile(release_ms, 50),
        "release_p99_ms": _percentile(release_ms, 99),
        # CPU per cycle is what the machine's load does not change much: cores needed = rate x cost.
        "broker_cpu_us_per_cycle": broker_cpu / max(1, done) * 1e6,
        "client_cpu_us_per_cycle": client_cpu / max(1, done) * 1e6,
        "broker_cpu_cores": broker_cpu / seconds,
    }


async def reclaim_precision(address: str, leases: int = 48) -> dict[str, Any]:
    """Grants leases with TTLs of 1..2 s that are never renewed; for each RECLAIMED event, how far
    after its deadline the broker revoked it (event time) and when a watcher heard of it."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        deadlines: dict[str, float] = {}
        revoke_ms: list[float] = []
        heard_ms: list[float] = []
        watch = stub.WatchLeases(resource_pb2.WatchLeasesRequest(live_only=True))
        await watch.wait_for_connection()  # subscribed before any of our grants
        after = 0

        async def listen() -> None:
            while True:
                event = await watch.read()
                if event is grpc.aio.EOF:
                    raise RuntimeError("the watch ended early")
                heard = time.time()
                if event.seq <= after or event.type != resource_pb2.LEASE_EVENT_TYPE_RECLAIMED:
                    continue
                deadline = deadlines.get(event.lease.name)
                if deadline is None:
                    continue
                revoked = event.time.seconds + event.time.nanos / 1e9
                revoke_ms.append((revoked - deadline) * 1000)
                heard_ms.append((heard - deadline) * 1000)
                if len(revoke_ms) == leases:
                    return

        listener = asyncio.create_task(listen())
        rng = random.Random(7)
        for i in range(leases):
            lease = await stub.Acquire(resource_pb2.AcquireRequest(
                kind=resource_pb2.SLOT_KIND_INFERENCE, ttl=_duration(1 + rng.random()),
                holder=resource_pb2.Holder(service="bench-reclaim", pid=os.getpid())), timeout=10)
            deadlines[lease.name] = lease.expire_time.seconds + lease.expire_time.nanos / 1e9
        await asyncio.wait_for(listener, 30)
        watch.cancel()
    return {
        "leases": leases,
        "revoke_after_deadline_ms": {"p50": _percentile(revoke_ms, 50), "p99": _percentile(revoke_ms, 99),
                                     "max": max(revoke_ms), "min": min(revoke_ms),
                                     "mean": statistics.fmean(revoke_ms)},
        "watcher_heard_after_deadline_ms": {"p50": _percentile(heard_ms, 50), "p99": _percentile(heard_ms, 99),
                                            "max": max(heard_ms)},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-resource-") as tmp:
        broker = Broker(Path(tmp), args.log_level, args.broker_arg or [])
        profiler = None
        try:
            await broker.wait_serving()
            if args.profile:
                raw = ["--format", "raw"] if args.profile.endswith(".txt") else []  # collapsed stacks
                profiler = subprocess.Popen(["py-spy", "record", "-o", args.profile, "-p", str(broker.proc.pid),
                                             "-r", "200", "--nonblocking", *raw])
            results = {"cycles": [], "log_level": args.log_level}
            for clients in levels:
                figures = await cycles(broker.address, clients, args.seconds, broker.proc.pid)
                results["cycles"].append(figures)
                print(f"  {clients:>3} clients: {figures['cycles_per_s']:8.0f} cycles/s  acquire p50 "
                      f"{figures['acquire_p50_ms']:.2f} ms  p99 {figures['acquire_p99_ms']:.2f} ms  "
                      f"broker cpu {figures['broker_cpu_us_per_cycle']:.0f} us/cycle ({figures['broker_cpu_cores']:.2f} cores)  "
                      f"client cpu {figures['client_cpu_us_per_cycle']:.0f} us/cycle  errors {figures['errors_by_code']}",
                      flush=True)
            # Closed-loop clients measure capacity, and their latency is mostly queueing (64 clients /
            # N cycles/s). At half that capacity, paced, the latency is the broker's own.
            peak = max(levels)
            paced_rate = results["cycles"][-1]["cycles_per_s"] / 2
            paced = await cycles(broker.address, peak, args.seconds, broker.proc.pid, rate=paced_rate)
            results["paced"] = paced
            print(f"  {peak:>3} clients paced at {paced_rate:.0f} cycles/s: {paced['cycles_per_s']:8.0f} cycles/s  acquire "
                  f"p50 {paced['acquire_p50_ms']:.2f} ms  p99 {paced['acquire_p99_ms']:.2f} ms", flush=True)
            results["reclaim"] = await reclaim_precision(broker.address)
            if args.ceiling:
                results["bare_grpc_ceiling"] = await bare_grpc_ceiling(max(levels), args.seconds)
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
            broker.stop()
    return results


def report(results: dict[str, Any]) -> None:
    print(f"\nlease broker (log level {results['log_level']}); goal at 64 clients: "
          f">= {GOAL_CYCLES_PER_S:.0f} cycles/s, p99 acquire <= {GOAL_P99_MS:.0f} ms")
    print(f"{'clients':>7} {'cycles/s':>9} {'x goal':>7} {'acq p50 ms':>10} {'acq p99 ms':>10} {'goal/p99':>8} "
          f"{'rel p50 ms':>10} {'errors':>6}")
    for c in results["cycles"]:
        print(f"{c['clients']:>7} {c['cycles_per_s']:>9.0f} {c['cycles_per_s'] / GOAL_CYCLES_PER_S:>7.2f} "
              f"{c['acquire_p50_ms']:>10.2f} {c['acquire_p99_ms']:>10.2f} {GOAL_P99_MS / c['acquire_p99_ms']:>8.2f} "
              f"{c['release_p50_ms']:>10.2f} {c['errors']:>6}")
    paced = results["paced"]
    print(f"{paced['clients']:>7} {paced['cycles_per_s']:>9.0f} {'paced':>7} {paced['acquire_p50_ms']:>10.2f} "
          f"{paced['acquire_p99_ms']:>10.2f} {GOAL_P99_MS / paced['acquire_p99_ms']:>8.2f} "
          f"{paced['release_p50_ms']:>10.2f} {paced['errors']:>6}   (offered {paced['offered_cycles_per_s']:.0f}/s)")
    bare = results.get("bare_grpc_ceiling")
    if bare:
        broker = results["cycles"][-1]
        print(f"transport ceiling: a bare grpc.aio server answering 2 unary calls per cycle reaches "
              f"{bare['cycles_per_s']:.0f} cycles/s at {bare['clients']} clients (server {bare['server_cpu_us_per_cycle']:.0f} "
              f"us, client {bare['client_cpu_us_per_cycle']:.0f} us CPU per cycle); the broker reaches "
              f"{broker['cycles_per_s'] / bare['cycles_per_s']:.0%} of it ({broker['broker_cpu_us_per_cycle']:.0f} us per cycle)")
    r = results["reclaim"]
    revoke, heard = r["revoke_after_deadline_ms"], r["watcher_heard_after_deadline_ms"]
    print(f"reclaim precision over {r['leases']} leases (limit: 1000 ms after the deadline): revoke p50 "
          f"{revoke['p50']:.2f} ms, p99 {revoke['p99']:.2f} ms, max {revoke['max']:.2f} ms; watcher heard p50 "
          f"{heard['p50']:.2f} ms, max {heard['max']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per client level")
    parser.add_argument("--levels", default="1,16,64", help="client counts, comma-separated")
    parser.add_argument("--log-level", default="info", help="the broker's log level (info logs every RPC)")
    parser.add_argument("--profile", default=None, metavar="SVG", help="record a py-spy profile of the broker (.svg flame graph, .txt collapsed stacks)")
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                        help="skip measuring the bare grpc.aio ceiling")
    parser.add_argument("--broker-arg", action="append", help="extra broker flag (repeatable), e.g. "
                                                              "--broker-arg=--sqlite-synchronous=normal")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    report(results)
    results["goal"] = {"cycles_per_s_at_64": GOAL_CYCLES_PER_S, "acquire_p99_ms_at_64": GOAL_P99_MS}
    write_result("resource", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
