"""Two gateway replicas on one PostgreSQL store and one data directory: a request_id raced through
both makes one job, the tenant's limit holds across them, a job running on one is watched live
and cancelled through the other, and a job queued on one is run by whichever is free.

These need a shared store, so they run on the PostgreSQL backend only (SQLite serves one gateway).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.helpers import Client, db_rows, job_dirs, use_database
from tests.pgserver import postgres_server, postgres_url  # noqa: F401 - fixtures

T = gateway_pb2


@pytest.fixture
def database_url(postgres_url):  # noqa: F811 - this module: PostgreSQL only
    use_database(postgres_url)
    yield postgres_url
    use_database("")


@pytest.fixture
async def two_gateways(start_gateway):
    first = await start_gateway(replica_id="gw-a", job_claim_ttl_s=2.0, job_poll_s=0.2)
    second = await start_gateway(replica_id="gw-b", job_claim_ttl_s=2.0, job_poll_s=0.2)
    async with Client(f"127.0.0.1:{first.port}") as a, Client(f"127.0.0.1:{second.port}") as b:
        yield a, b


async def _upload_until_answered(client: Client, data: bytes, **fields) -> common_pb2.Job:
    """CreateJob, retried while another call streams the same request_id (ABORTED, as documented)."""
    for _ in range(200):
        try:
            return await client.upload(data, **fields)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("the upload stayed in progress")


async def test_a_request_id_raced_through_two_replicas_makes_one_job(two_gateways, runner_bytes, data_dir):
    a, b = two_gateways
    calls = [_upload_until_answered(client, runner_bytes, request_id="race-1") for client in (a, b) * 5]
    jobs = await asyncio.gather(*calls)
    assert len({job.name for job in jobs}) == 1
    await a.wait(jobs[0].name)
    assert db_rows(data_dir)["jobs"] == 1 and job_dirs(data_dir) == [jobs[0].name.removeprefix("jobs/")]


async def test_the_tenant_limit_holds_across_replicas(start_gateway, stages, runner_bytes):
    stages.tracker.knobs.mode = "hang"  # accepted jobs stay active
    gateways = [await start_gateway(replica_id=f"gw-{i}", max_active_jobs_per_tenant=3) for i in range(2)]
    async with Client(f"127.0.0.1:{gateways[0].port}") as a, Client(f"127.0.0.1:{gateways[1].port}") as b:
        # Distinct options, so content dedup does not merge them.
        calls = [(a, b)[i % 2].upload(runner_bytes, options=common_pb2.JobOptions(max_persons=i + 1)) for i in range(8)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    accepted = [o for o in outcomes if isinstance(o, common_pb2.Job)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(accepted) == 3 and len(refused) == 5
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_a_job_is_watched_live_and_cancelled_through_the_other_replica(two_gateways, stages, runner_bytes):
    a, b = two_gateways
    stages.tracker.knobs.mode = "chatty"  # many progress events while it runs
    stages.tracker.knobs.gate.clear()  # the tracker waits mid-call
    job = await a.upload(runner_bytes)
    running = await b.wait(job.name, {common_pb2.JOB_STATE_RUNNING})
    assert running.state == common_pb2.JOB_STATE_RUNNING
    watch = b.stub.WatchJob(T.WatchJobRequest(name=job.name), timeout=60)
    seen = [await watch.read() for _ in range(3)]  # created, running, track started
    started = time.monotonic()
    cancelled = await b.stub.CancelJob(T.CancelJobRequest(name=job.name), timeout=30)
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    rest = []
    while (event := await watch.read()) is not grpc.aio.EOF:
        rest.append(event)
    events = seen + rest
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].state == common_pb2.JOB_STATE_CANCELLED
    # The replica running it stops the stage call at its next heartbeat (a third of the TTL).
    assert await asyncio.to_thread(stages.tracker.knobs.cancelled.wait, 30)
    print(f"remote cancel reached the stage in {time.monotonic() - started:.2f} s")
    stages.tracker.knobs.gate.set()
    assert (await a.get(job.name)).state == common_pb2.JOB_STATE_CANCELLED


async def test_jobs_from_both_replicas_all_succeed_with_gap_free_events(two_gateways, runner_bytes):
    a, b = two_gateways
    jobs = await asyncio.gather(*[(a, b)[i % 2].upload(runner_bytes, options=common_pb2.JobOptions(max_persons=i + 1)) for i in range(4)])
    for job in jobs:
        done = await b.wait(job.name)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
        events = await a.events(job.name)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].state == common_pb2.JOB_STATE_SUCCEEDED
