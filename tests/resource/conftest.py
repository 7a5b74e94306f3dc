"""Fixtures: the broker as a real child process (`python -m resource_svc`) on a tmp_path SQLite file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from mocap.v1 import resource_pb2, resource_pb2_grpc
from tests.support import ServiceProcess

BrokerFactory = Callable[..., ServiceProcess]


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[BrokerFactory]:
    """start_broker(*flags, port=None) -> a SERVING broker on tmp_path/leases.sqlite3; a restart is
    start_broker(..., port=old.port) after stop()/kill(). All are stopped at the end."""
    started: list[ServiceProcess] = []

    def start(*flags: str, port: int | None = None, db: Path | None = None) -> ServiceProcess:
        args = ["--db-path", str(db or tmp_path / "leases.sqlite3"), "--inventory", "cpu", "--log-format",
                "console", "--grace-seconds", "1", *flags]
        broker = ServiceProcess("resource_svc", args, log_path=tmp_path / "broker.log", port=port)
        broker.start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(start_broker: BrokerFactory) -> ServiceProcess:
    """One CPU device: 1 training slot, 2 inference slots (the defaults)."""
    return start_broker()


def stub(channel: grpc.aio.Channel) -> resource_pb2_grpc.ResourceServiceStub:
    return resource_pb2_grpc.ResourceServiceStub(channel)


def acquire_request(kind: int = resource_pb2.SLOT_KIND_TRAINING, *, ttl_s: float = 30, priority: int = 0,
                    request_id: str = "", service: str = "test", pid: int = 4242, job: str = "",
                    max_wait_s: float | None = None, device: str | None = None) -> resource_pb2.AcquireRequest:
    req = resource_pb2.AcquireRequest(kind=kind, priority=priority, request_id=request_id,
                                      holder=resource_pb2.Holder(service=service, pid=pid, host="test-host", job=job))
    req.ttl.FromNanoseconds(int(ttl_s * 1e9))
    if max_wait_s is not None:
        req.max_wait.FromNanoseconds(int(max_wait_s * 1e9))
    if device is not None:
        req.device.uuid = device
    return req


def seconds(timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


async def eventually(check: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> object:
    """Awaits `check()` (sync or async) until it returns something truthy; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def waiting_count(channel: grpc.aio.Channel, kind: int = resource_pb2.SLOT_KIND_TRAINING) -> int:
    devices = (await stub(channel).ListDevices(resource_pb2.ListDevicesRequest(), timeout=5)).devices
    return sum(s.waiting for d in devices for s in d.slots if s.kind == kind)
