"""A tracker that loses its lease broker in the middle of a Track call ends the job FAILED with the
lease loss named, and nothing of the transport (no "ipv4:127.0.0.1:…", no "Failed to connect to
remote host") reaches the client: not in GetJob's error, not in WatchJob's events. Real tracker
and real broker as child processes; the other stages are the gateway tests' fakes."""

from __future__ import annotations

import asyncio

import pytest

from mocap.v1 import common_pb2, gateway_pb2, resource_pb2
from mocap_common.lease_client import LeaseClient
from tests.gateway.helpers import Client
from tests.gateway.leaks import LEAKS
from tests.support import ServiceProcess

pytestmark = pytest.mark.timeout(240)

LEASE_TTL_S = 1.5  # the broker's minimum is 1 s; the tracker notices the loss about a TTL after the kill


@pytest.fixture
async def broker_and_tracker(tmp_path):
    broker = ServiceProcess("resource_svc", ["--db-path", str(tmp_path / "leases.sqlite3")], log_path=tmp_path / "resource.log")
    tracker = ServiceProcess("tracker_svc", ["--resource-addr", broker.address, "--lease-ttl-s", str(LEASE_TTL_S),
                                             "--spool-dir", str(tmp_path / "spool")],
                             log_path=tmp_path / "tracker.log", ready_timeout_s=120)
    try:
        await asyncio.to_thread(broker.start)
        await asyncio.to_thread(tracker.start)
        yield broker, tracker
    finally:
        await asyncio.to_thread(tracker.stop)
        await asyncio.to_thread(broker.stop)


async def _wait_for_active_lease(address: str, timeout_s: float = 120.0) -> None:
    async with LeaseClient(address) as client:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await client.list_leases(state=resource_pb2.LEASE_STATE_ACTIVE, timeout_s=5):
            assert asyncio.get_running_loop().time() < deadline, "the tracker never took a lease"
            await asyncio.sleep(0.02)


async def _wait_for_track_progress(client: Client, name: str, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        job = await client.get(name)
        if job.stage == common_pb2.JOB_STAGE_TRACK and job.progress > 0:
            return
        assert job.state in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING), job
        assert asyncio.get_running_loop().time() < deadline, "the track stage never reported progress"
        await asyncio.sleep(0.02)


async def test_a_tracker_that_loses_its_broker_fails_the_job_without_leaking_addresses(
        start_gateway, broker_and_tracker, runner_bytes):
    broker, tracker = broker_and_tracker
    gateway = await start_gateway(tracker_addr=tracker.address)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        await _wait_for_active_lease(broker.address)  # the tracker holds its lease and is tracking
        # ... and has answered (progress reached the job): from here the stage cannot be retried,
        # so the loss must end the job as LEASE_LOST. Killed earlier, the broker would make the
        # tracker answer UNAVAILABLE, which the gateway retries (a different, correct outcome).
        await _wait_for_track_progress(client, job.name)
        await asyncio.to_thread(broker.kill)  # SIGKILL: keep-alives now fail with "Connection refused"
        ended = await client.wait(job.name, timeout_s=120)
        events = await client.events(job.name)

    assert ended.state == common_pb2.JOB_STATE_FAILED, ended
    assert ended.error.stage == common_pb2.JOB_STAGE_TRACK
    assert ended.error.reason == "STAGE_FAILED" and ended.error.message.endswith("[LEASE_LOST]"), ended.error
    assert "lease" in ended.error.message and "lost" in ended.error.message
    shown = [ended.error.message, *(e.message for e in events), *(e.job.error.message for e in events)]
    for text in shown:
        assert not LEAKS.search(text), text
        assert broker.address not in text and str(broker.port) not in text, text
    terminal = events[-1]
    assert terminal.type == gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED and terminal.state == common_pb2.JOB_STATE_FAILED
    # The detail is not lost: the tracker's log has gRPC's own words.
    assert "lease lost" in tracker.log_text()
