"""mocap_common.lease_client against a real broker process: release on every way out of the block,
lease loss cancels the block with LeaseLost, keep-alive survives a broker restart, clear errors."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from mocap.v1 import resource_pb2
from mocap_common.errors import DeadlineExceeded, ServiceError, Unavailable
from mocap_common.lease_client import LeaseClient, LeaseLost, lease
from tests.support import free_port

from .conftest import stub


async def _state(address: str, name: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await stub(channel).GetLease(resource_pb2.GetLeaseRequest(name=name), timeout=5)).state


async def test_block_holds_a_valid_lease_and_releases_it_on_exit(broker):
    async with lease(broker.address, kind="inference", holder_service="tracker", job="jobs/1", ttl_s=2) as held:
        assert held.device == "cpu:0" and held.torch_device() == "cpu" and held.device_index == -1
        await asyncio.sleep(2.5)  # longer than the TTL: the keep-alive renews it
        assert await held.validate() and not held.lost.is_set()
    assert await _state(broker.address, held.name) == resource_pb2.LEASE_STATE_RELEASED


async def test_releases_when_the_block_raises(broker):
    with pytest.raises(ValueError, match="stage failed"):
        async with lease(broker.address, kind="training", holder_service="smoother") as held:
            raise ValueError("stage failed")
    assert await _state(broker.address, held.name) == resource_pb2.LEASE_STATE_RELEASED


async def test_releases_when_the_block_is_cancelled(broker):
    entered = asyncio.Event()
    names = []

    async def work() -> None:
        async with lease(broker.address, kind="training", holder_service="tracker") as held:
            names.append(held.name)
            entered.set()
            await asyncio.sleep(600)

    task = asyncio.create_task(work())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _state(broker.address, names[0]) == resource_pb2.LEASE_STATE_RELEASED


async def test_loss_reported_by_the_broker_cancels_the_block_with_lease_lost(broker):
    """Someone with the token (an operator) releases the lease: the next keep-alive hears of it."""
    reached_end = False
    with pytest.raises(LeaseLost) as raised:
        async with lease(broker.address, kind="training", holder_service="tracker", ttl_s=1.5) as held:
            async with grpc.aio.insecure_channel(broker.address) as channel:
                await stub(channel).Release(resource_pb2.ReleaseRequest(
                    name=held.name, fencing_token=held.fencing_token), timeout=5)
            started = time.monotonic()
            await asyncio.sleep(30)
            reached_end = True
    assert not reached_end and time.monotonic() - started < 1.5
    assert held.lost.is_set() and "gone" in held.lost_reason and raised.value.name == held.name
    assert not asyncio.current_task().cancelling()  # our task is not left half-cancelled


async def test_loss_when_the_broker_is_unreachable_cancels_the_block_before_the_deadline(broker):
    with pytest.raises(LeaseLost, match="no renewal"):
        async with lease(broker.address, kind="training", holder_service="tracker", ttl_s=2) as held:
            granted = time.monotonic()
            broker.kill()
            await asyncio.sleep(30)
    assert time.monotonic() - granted < 2.0  # it gives up before the broker could re-grant the slot
    assert held.lost.is_set()


async def test_without_cancel_on_loss_the_block_watches_lost_and_the_exit_raises(broker):
    with pytest.raises(LeaseLost):
        async with lease(broker.address, kind="training", holder_service="x", ttl_s=1.5,
                         cancel_on_loss=False) as held:
            async with LeaseClient(broker.address) as client:
                await client.release(held.name, held.fencing_token)
            await asyncio.wait_for(held.lost.wait(), 5)


async def test_keepalive_rides_out_a_broker_restart(start_broker):
    broker = start_broker()
    async with lease(broker.address, kind="inference", holder_service="tracker", ttl_s=4) as held:
        broker.stop()
        broker = start_broker(port=broker.port)
        await asyncio.sleep(4.5)  # past the original deadline: only renewals kept it
        assert not held.lost.is_set() and await held.validate()
    assert await _state(broker.address, held.name) == resource_pb2.LEASE_STATE_RELEASED


async def test_release_failure_never_masks_the_block_error(broker):
    with pytest.raises(KeyError):
        async with lease(broker.address, kind="training", holder_service="x", ttl_s=30):
            broker.kill()
            raise KeyError("the real problem")


async def test_acquire_errors_are_clear(broker):
    async with LeaseClient(broker.address) as client:
        held = await client.acquire(kind="training", holder_service="x")
        with pytest.raises(DeadlineExceeded) as raised:
            async with lease(broker.address, kind="training", holder_service="y", acquire_timeout_s=0.3):
                pass
        assert raised.value.reason == "NO_SLOT"
        await client.release(held.name, held.fencing_token)
        with pytest.raises(ServiceError) as raised:
            await client.acquire(kind="training", holder_service="x", device="gpu:5")
        assert raised.value.reason == "NO_SUCH_DEVICE"
    with pytest.raises(Unavailable) as raised:
        async with lease(f"127.0.0.1:{free_port()}", kind="training", holder_service="x"):
            pass
    assert raised.value.reason == "NOT_READY"
