"""The broker through its gRPC surface, running as a real child process on a real SQLite file:
reclaim and hand-over, waiting with deadlines, fairness, idempotency, owner checks, restarts,
keep-alive streams, watches, listings and request validation."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest

from mocap.v1 import resource_pb2
from mocap_common.rpc_errors import describe_rpc_error
from tests.support import free_port

from .conftest import acquire_request, eventually, seconds, stub, waiting_count

TRAINING = resource_pb2.SLOT_KIND_TRAINING
INFERENCE = resource_pb2.SLOT_KIND_INFERENCE


async def _error(awaitable) -> tuple[grpc.StatusCode, str, object]:
    with pytest.raises(grpc.RpcError) as raised:
        await awaitable
    details = describe_rpc_error(raised.value)
    return details.code, details.reason, details


async def _events_after(channel, after_seq: int, count: int) -> list[resource_pb2.LeaseEvent]:
    call = stub(channel).WatchLeases(resource_pb2.WatchLeasesRequest(after_seq=after_seq), timeout=10)
    events = []
    async for event in call:
        events.append(event)
        if len(events) == count:
            break
    call.cancel()
    return events


async def test_holder_that_stops_renewing_is_reclaimed_within_ttl_plus_1s_and_the_waiter_gets_it(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        silent = await rs.Acquire(acquire_request(ttl_s=2, service="crashy", pid=111, job="jobs/a"), timeout=5)
        started = time.time()
        successor = await rs.Acquire(acquire_request(ttl_s=30, pid=222), timeout=10)  # waits for the slot
        waited = time.time() - started
        assert successor.slot == silent.slot and successor.fencing_token == silent.fencing_token + 1
        # Reclaimed within TTL + 1 s of the grant, by the broker's clock and the waiter's.
        assert seconds(successor.grant_time) - seconds(silent.grant_time) <= 2 + 1
        assert waited <= 2 + 1 + 0.5  # + the calls' own latency on a loaded machine
        lost = await rs.GetLease(resource_pb2.GetLeaseRequest(name=silent.name), timeout=5)
        assert lost.state == resource_pb2.LEASE_STATE_RECLAIMED
        events = await _events_after(channel, 0, 3)
        assert [e.type for e in events] == [resource_pb2.LEASE_EVENT_TYPE_GRANTED,
                                            resource_pb2.LEASE_EVENT_TYPE_RECLAIMED,
                                            resource_pb2.LEASE_EVENT_TYPE_GRANTED]
        reclaim = events[1]
        assert (reclaim.lease.name, reclaim.lease.holder.service, reclaim.lease.holder.pid,
                reclaim.lease.holder.job) == (silent.name, "crashy", 111, "jobs/a")  # who lost it
        assert seconds(reclaim.time) - seconds(silent.expire_time) < 1.0
        code, reason, _ = await _error(rs.Release(resource_pb2.ReleaseRequest(
            name=silent.name, fencing_token=silent.fencing_token), timeout=5))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "LEASE_LOST")
    assert "lease reclaimed" in broker.log_text() and "holder_pid=111" in broker.log_text()


async def test_waiter_whose_deadline_passes_gets_no_slot_and_leaves_the_queue(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        await rs.Acquire(acquire_request(), timeout=5)
        code, reason, details = await _error(rs.Acquire(acquire_request(), timeout=1.0))
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "NO_SLOT"), details
        assert await waiting_count(channel) == 0
        # max_wait bounds the wait without a call deadline.
        code, reason, _ = await _error(rs.Acquire(acquire_request(max_wait_s=0.3), timeout=10))
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "NO_SLOT")
        # A caller that goes away leaves the queue at once.
        call = rs.Acquire(acquire_request(), timeout=30)
        await eventually(lambda: waiting_count(channel), what="the waiter to queue")
        call.cancel()
        await eventually(lambda: _is_zero(waiting_count(channel)), timeout_s=2, what="the waiter to leave")


async def _is_zero(count) -> bool:
    return await count == 0


async def test_waiters_are_served_by_priority_then_first_come(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        current = await rs.Acquire(acquire_request(pid=1), timeout=5)
        priorities = [0, 10, 0, 10, -5]
        calls = []
        for i, priority in enumerate(priorities):
            calls.append(asyncio.ensure_future(rs.Acquire(acquire_request(priority=priority, pid=100 + i),
                                                          timeout=30)))
            await eventually(lambda n=i + 1: _equals(waiting_count(channel), n), what=f"{i + 1} waiters")
        order = []
        pending = set(calls)  # a grant may land while Release is still returning: track, don't poll done()
        for _ in priorities:
            released = await rs.Release(resource_pb2.ReleaseRequest(
                name=current.name, fencing_token=current.fencing_token), timeout=5)
            assert released.released
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            [granted] = done
            pending -= done
            current = granted.result()
            order.append(current.holder.pid - 100)
        assert order == [1, 3, 0, 2, 4]


async def _equals(count, n: int) -> bool:
    return await count == n


async def test_request_id_is_idempotent_and_stale_tokens_are_refused(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        lease = await rs.Acquire(acquire_request(INFERENCE, request_id="job-42.step:1"), timeout=5)
        again = await rs.Acquire(acquire_request(INFERENCE, request_id="job-42.step:1"), timeout=5)
        assert (again.name, again.fencing_token, again.request_id) == (lease.name, lease.fencing_token,
                                                                      "job-42.step:1")
        code, reason, _ = await _error(rs.Acquire(acquire_request(INFERENCE, request_id="job-42.step:1",
                                                                  priority=7), timeout=5))
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "LEASE_REQUEST_REUSED")
        other = await rs.Acquire(acquire_request(INFERENCE), timeout=5)
        for token in (lease.fencing_token + 1, other.fencing_token + 7):
            code, reason, details = await _error(rs.Release(resource_pb2.ReleaseRequest(
                name=lease.name, fencing_token=token), timeout=5))
            assert (code, reason, details.metadata["lease"]) == (grpc.StatusCode.ABORTED, "LEASE_LOST",
                                                                 lease.name)
        code, reason, _ = await _error(rs.Renew(resource_pb2.RenewRequest(
            name=lease.name, fencing_token=lease.fencing_token + 1), timeout=5))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "LEASE_LOST")
        assert (await rs.ValidateLease(resource_pb2.ValidateLeaseRequest(
            name=lease.name, fencing_token=lease.fencing_token), timeout=5)).valid
        released = await rs.Release(resource_pb2.ReleaseRequest(name=lease.name, fencing_token=lease.fencing_token),
                                    timeout=5)
        assert released.released and released.lease.state == resource_pb2.LEASE_STATE_RELEASED
        retried = await rs.Release(resource_pb2.ReleaseRequest(name=lease.name, fencing_token=lease.fencing_token),
                                   timeout=5)
        assert not retried.released  # idempotent for the holder
        validation = await rs.ValidateLease(resource_pb2.ValidateLeaseRequest(
            name=lease.name, fencing_token=lease.fencing_token), timeout=5)
        assert not validation.valid and validation.lease.state == resource_pb2.LEASE_STATE_RELEASED
        code, reason, _ = await _error(rs.Acquire(acquire_request(INFERENCE, request_id="job-42.step:1"),
                                                  timeout=5))
        assert (code, reason) == (grpc.StatusCode.ABORTED, "LEASE_LOST")  # that grant is over


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_restart_keeps_live_leases_reclaims_expired_ones_and_tokens_increase(start_broker, how):
    broker = start_broker()
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        long = await rs.Acquire(acquire_request(INFERENCE, ttl_s=60, request_id="long"), timeout=5)
        short = await rs.Acquire(acquire_request(INFERENCE, ttl_s=1), timeout=5)
        [seen] = [e.seq for e in await _events_after(channel, 1, 1)]
    broker.stop() if how == "sigterm" else broker.kill()
    await asyncio.sleep(max(0.0, seconds(short.expire_time) - time.time()) + 0.1)

    broker = start_broker(port=broker.port)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        assert (await rs.ValidateLease(resource_pb2.ValidateLeaseRequest(
            name=long.name, fencing_token=long.fencing_token), timeout=5)).valid
        assert (await rs.GetLease(resource_pb2.GetLeaseRequest(name=short.name), timeout=5)).state == \
            resource_pb2.LEASE_STATE_RECLAIMED
        again = await rs.Acquire(acquire_request(INFERENCE, ttl_s=60, request_id="long"), timeout=5)
        assert again.name == long.name  # request_ids survive the restart too
        renewed = await rs.Renew(resource_pb2.RenewRequest(name=long.name, fencing_token=long.fencing_token),
                                 timeout=5)
        assert seconds(renewed.expire_time) > seconds(long.expire_time)
        fresh = await rs.Acquire(acquire_request(INFERENCE), timeout=5)
        assert (fresh.slot, fresh.fencing_token) == (short.slot, short.fencing_token + 1)
        code, reason, _ = await _error(rs.Acquire(acquire_request(INFERENCE, max_wait_s=0), timeout=5))
        assert (code, reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "NO_SLOT")  # no double grant
        # The event history resumes across the restart: reclaim recorded at startup, then the grant.
        events = await _events_after(channel, seen, 3)
        assert [e.seq for e in events] == list(range(seen + 1, seen + 4))
        assert [(e.type, e.lease.name) for e in events] == [
            (resource_pb2.LEASE_EVENT_TYPE_RECLAIMED, short.name), (resource_pb2.LEASE_EVENT_TYPE_RENEWED, long.name),
            (resource_pb2.LEASE_EVENT_TYPE_GRANTED, fresh.name)]


async def test_keepalive_stream_extends_leases_and_reports_loss(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        lease = await rs.Acquire(acquire_request(ttl_s=5), timeout=5)
        call = rs.KeepAlive(timeout=20)
        request = resource_pb2.KeepAliveRequest(name=lease.name, fencing_token=lease.fencing_token)
        expiries = []
        for _ in range(3):
            await call.write(request)
            response = await call.read()
            assert not response.lost and response.state == resource_pb2.LEASE_STATE_ACTIVE
            expiries.append(seconds(response.expire_time))
            await asyncio.sleep(0.05)
        assert expiries == sorted(expiries) and expiries[0] >= seconds(lease.expire_time)
        await rs.Release(resource_pb2.ReleaseRequest(name=lease.name, fencing_token=lease.fencing_token), timeout=5)
        await call.write(request)
        response = await call.read()
        assert response.lost and response.state == resource_pb2.LEASE_STATE_RELEASED
        await call.write(resource_pb2.KeepAliveRequest(name=lease.name, fencing_token=99))
        assert (await call.read()).lost
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF


async def test_listings_pages_and_devices(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        names = []
        for _ in range(5):
            lease = await rs.Acquire(acquire_request(INFERENCE), timeout=5)
            names.append(lease.name)
            await rs.Release(resource_pb2.ReleaseRequest(name=lease.name, fencing_token=lease.fencing_token),
                             timeout=5)
        held = await rs.Acquire(acquire_request(TRAINING, job="jobs/x"), timeout=5)
        seen, token = [], ""
        while True:
            page = await rs.ListLeases(resource_pb2.ListLeasesRequest(page_size=2, page_token=token), timeout=5)
            seen += [lease.name for lease in page.leases]
            token = page.next_page_token
            if not token:
                break
        assert seen == [held.name, *reversed(names)]  # newest first
        active = await rs.ListLeases(resource_pb2.ListLeasesRequest(state=resource_pb2.LEASE_STATE_ACTIVE), timeout=5)
        assert [lease.name for lease in active.leases] == [held.name]
        [device] = (await rs.ListDevices(resource_pb2.ListDevicesRequest(), timeout=5)).devices
        assert (device.id, device.kind, device.uuid) == ("cpu:0", resource_pb2.DEVICE_KIND_CPU, "")
        usage = {s.kind: (s.total, s.used, s.waiting) for s in device.slots}
        assert usage == {TRAINING: (1, 1, 0), INFERENCE: (2, 0, 0)}


async def test_devices_come_in_pages_and_page_size_0_is_all_of_them(start_broker):
    broker = start_broker("--cpu-devices", "5")
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        everything = await rs.ListDevices(resource_pb2.ListDevicesRequest(), timeout=5)  # as before paging
        ids = [f"cpu:{n}" for n in range(5)]
        assert [d.id for d in everything.devices] == ids and everything.next_page_token == ""
        seen, token, pages = [], "", 0
        while True:
            page = await rs.ListDevices(resource_pb2.ListDevicesRequest(page_size=2, page_token=token), timeout=5)
            seen += [d.id for d in page.devices]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == ids and pages == 3
        first = await rs.ListDevices(resource_pb2.ListDevicesRequest(page_size=3), timeout=5)
        rest = await rs.ListDevices(resource_pb2.ListDevicesRequest(page_token=first.next_page_token), timeout=5)
        assert [d.id for d in rest.devices] == ids[3:] and rest.next_page_token == ""
        for bad, field in ((resource_pb2.ListDevicesRequest(page_size=-1), "page_size"),
                           (resource_pb2.ListDevicesRequest(page_token="bm9wZQ"), "page_token")):
            code, _, details = await _error(rs.ListDevices(bad, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.violations[0].field == field


async def test_invalid_requests_are_refused_with_the_field_named(broker):
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        bad = acquire_request(ttl_s=0.5, priority=500, request_id="no spaces allowed")
        bad.kind = resource_pb2.SLOT_KIND_UNSPECIFIED
        code, reason, details = await _error(rs.Acquire(bad, timeout=5))
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
        assert {v.field for v in details.violations} == {"kind", "ttl", "priority", "request_id"}
        code, _, details = await _error(rs.Release(resource_pb2.ReleaseRequest(name="jobs/1", fencing_token=1),
                                                   timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.violations[0].field == "name"
        code, reason, _ = await _error(rs.Acquire(acquire_request(device="gpu:3"), timeout=5))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NO_SUCH_DEVICE")
        code, reason, _ = await _error(rs.GetLease(resource_pb2.GetLeaseRequest(name="leases/abc"), timeout=5))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")


async def test_prometheus_metrics_follow_the_state(start_broker):
    metrics_port = free_port()
    broker = start_broker("--metrics-port", str(metrics_port))
    async with grpc.aio.insecure_channel(broker.address) as channel:
        rs = stub(channel)
        await rs.Acquire(acquire_request(TRAINING, ttl_s=1), timeout=5)  # never renewed
        waiter = asyncio.ensure_future(rs.Acquire(acquire_request(TRAINING, ttl_s=30), timeout=10))
        await eventually(lambda: waiting_count(channel), what="a waiter")
        text = await asyncio.to_thread(_scrape, metrics_port)
        assert _sample(text, 'mocap_resource_waiters{kind="training"}') == 1
        assert _sample(text, 'mocap_resource_leases_active{device="cpu:0",kind="training"}') == 1
        granted = await waiter  # after `held` is reclaimed
        await rs.Release(resource_pb2.ReleaseRequest(name=granted.name, fencing_token=granted.fencing_token),
                         timeout=5)
    text = await asyncio.to_thread(_scrape, metrics_port)
    assert _sample(text, 'mocap_resource_lease_grants_total{device="cpu:0",kind="training"}') == 2
    assert _sample(text, 'mocap_resource_lease_reclaims_total{device="cpu:0",kind="training"}') == 1
    assert _sample(text, 'mocap_resource_lease_releases_total{device="cpu:0",kind="training"}') == 1
    assert _sample(text, 'mocap_resource_leases_active{device="cpu:0",kind="training"}') == 0
    assert _sample(text, 'mocap_resource_waiters{kind="training"}') == 0
    assert _sample(text, 'mocap_resource_acquire_wait_seconds_count{kind="training"}') == 2
    assert _sample(text, "mocap_resource_reclaim_delay_seconds_count") == 1


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exported")
