"""A process of lease holders for the mutual-exclusion test (`python -m tests.resource.holder_worker`).

    python -m tests.resource.holder_worker ADDRESS LOG_FILE SEED CLIENTS STOP_AT

CLIENTS coroutines acquire random slots with random TTLs until the wall time STOP_AT and log
what they were told, one line per fact, flushed at once (the test SIGKILLs some workers):

    G name token device kind slot t_ack expire   granted; t_ack = wall time the grant arrived
    R name expire                                 a renewal was confirmed (Renew or KeepAlive)
    X name t_stop                                 the holder stopped using the slot (then releases)

Holders behave like real ones: most hold briefly and release, some keep the lease alive over the
KeepAlive stream for longer than its TTL, some renew with Renew, and some stop renewing without
releasing (a hung or crashed worker) — the broker must reclaim those.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

import grpc

from mocap.v1 import resource_pb2, resource_pb2_grpc


def _seconds(timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


async def holder(stub, log, rng: random.Random, name: str, stop_at: float) -> None:
    n = 0
    while time.time() < stop_at:
        n += 1
        kind = rng.choice((resource_pb2.SLOT_KIND_TRAINING, resource_pb2.SLOT_KIND_INFERENCE,
                           resource_pb2.SLOT_KIND_INFERENCE))
        ttl = rng.uniform(1.0, 3.0)
        request = resource_pb2.AcquireRequest(kind=kind, priority=rng.choice((0, 0, 0, 5)),
                                              request_id=f"{name}-{n}",
                                              holder=resource_pb2.Holder(service="mx", job=name, pid=os.getpid()))
        request.ttl.FromNanoseconds(int(ttl * 1e9))
        request.max_wait.FromNanoseconds(int(rng.uniform(0.5, 3.0) * 1e9))
        try:
            lease = await stub.Acquire(request, timeout=5)
        except grpc.RpcError:
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            continue
        t_ack = time.time()
        log(f"G {lease.name} {lease.fencing_token} {lease.device} {lease.kind} {lease.slot} {t_ack!r} "
            f"{_seconds(lease.expire_time)!r}")
        mode = rng.random()
        if mode < 0.1:  # stops renewing and never releases: the broker must reclaim it
            await asyncio.sleep(ttl + 0.2)
            continue
        try:
            if mode < 0.3:
                await _keep_alive(stub, log, lease, ttl)
            elif mode < 0.4:
                await _renew(stub, log, lease, ttl, rng)
            else:
                await asyncio.sleep(rng.uniform(0.0, min(0.3, ttl / 3)))
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the broker went away (a stream ends either way): stop using the slot now
        log(f"X {lease.name} {time.time()!r}")
        try:
            await stub.Release(resource_pb2.ReleaseRequest(name=lease.name, fencing_token=lease.fencing_token),
                               timeout=3)
        except grpc.RpcError:
            pass


async def _keep_alive(stub, log, lease, ttl: float) -> None:
    call = stub.KeepAlive(timeout=ttl * 2 + 5)
    request = resource_pb2.KeepAliveRequest(name=lease.name, fencing_token=lease.fencing_token)
    until = time.time() + ttl * 1.5
    try:
        while time.time() < until:
            await call.write(request)
            response = await call.read()
            if response is grpc.aio.EOF or response.lost:
                return
            log(f"R {lease.name} {_seconds(response.expire_time)!r}")
            await asyncio.sleep(ttl / 3)
    finally:
        call.cancel()


async def _renew(stub, log, lease, ttl: float, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        await asyncio.sleep(ttl / 3)
        renewed = await stub.Renew(resource_pb2.RenewRequest(name=lease.name, fencing_token=lease.fencing_token),
                                   timeout=ttl / 3)
        log(f"R {lease.name} {_seconds(renewed.expire_time)!r}")


async def main(address: str, log_path: str, seed: int, clients: int, stop_at: float) -> None:
    out = open(log_path, "a", buffering=1)

    def log(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    options = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        await asyncio.gather(*(holder(stub, log, random.Random(seed * 1000 + i), f"w{seed}c{i}", stop_at)
                               for i in range(clients)))


if __name__ == "__main__":
    address, log_path, seed, clients, stop_at = sys.argv[1:6]
    asyncio.run(main(address, log_path, int(seed), int(clients), float(stop_at)))
