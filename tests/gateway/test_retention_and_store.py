"""Retention removes old jobs and abandoned uploads; the store refuses illegal transitions in SQL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import grpc
import pytest

from gateway.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobError, JobRecord, canonical_options, now_us
from gateway.store import SqliteJobStore
from mocap.v1 import common_pb2, gateway_pb2
from gateway.retention import ORPHAN_MIN_AGE_S
from tests.gateway.helpers import Client, chunks, database_url, db_rows, header, job_dirs, rpc_error


async def _poll(predicate, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


async def test_retention_removes_ended_jobs_and_their_files(start_gateway, runner_bytes, data_dir):
    gateway = await start_gateway(job_retention_s=0.5, retention_interval_s=0.2)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.wait((await client.upload(runner_bytes, request_id="old-1")).name)
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED and job_dirs(data_dir)

        async def gone() -> bool:
            try:
                await client.get(job.name)
                return False
            except grpc.aio.AioRpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND

        await _poll(gone)
        missing = await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="old-1")))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert job_dirs(data_dir) == [] and db_rows(data_dir) == {"jobs": 0, "uploads": 0, "events": 0, "artifacts": 0}


async def _abandon_upload(client: Client, data: bytes, request_id: str) -> None:
    sent = asyncio.Event()

    async def stream():
        yield header(data, request_id=request_id)
        yield chunks(data)[0]
        sent.set()
        await asyncio.Event().wait()

    call = client.stub.CreateJob(stream())
    await sent.wait()
    await asyncio.sleep(0.2)
    call.cancel()


async def test_abandoned_uploads_expire_periodically(start_gateway, runner_bytes, data_dir):
    gateway = await start_gateway(upload_retention_s=0.5, retention_interval_s=0.2)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        await _abandon_upload(client, runner_bytes, "stale-1")

        async def expired() -> bool:
            return db_rows(data_dir)["uploads"] == 0

        await _poll(expired)
    assert job_dirs(data_dir) == []


async def test_startup_sweep_removes_expired_uploads_and_orphans(start_gateway, runner_bytes, data_dir):
    first = await start_gateway(upload_retention_s=0.3)
    async with Client(f"127.0.0.1:{first.port}") as client:
        await _abandon_upload(client, runner_bytes, "stale-2")
        await _poll(lambda: asyncio.sleep(0, result=db_rows(data_dir)["uploads"] == 1))
    await first.stop()
    orphans = [data_dir / "jobs" / "not-a-job", data_dir / "jobs" / "stray.tmp"]
    orphans[0].mkdir()
    orphans[1].write_bytes(b"x")
    young = data_dir / "jobs" / "j-youngyoungyoungyoung"
    young.mkdir()
    if database_url():
        # Shared store: another replica may be creating a directory right now, so only orphans
        # older than ORPHAN_MIN_AGE_S go (with SQLite, one gateway, every orphan goes).
        for path in orphans:
            os.utime(path, (time.time() - ORPHAN_MIN_AGE_S - 1,) * 2)
    await asyncio.sleep(0.5)
    await start_gateway(upload_retention_s=0.3)
    assert job_dirs(data_dir) == (["j-youngyoungyoungyoung"] if database_url() else [])
    assert db_rows(data_dir)["uploads"] == 0


# ---------------------------------------------------------------------------------------------
# Store


def _job(job_id: str = "j-aaaaaaaaaaaaaaaaaaaa") -> JobRecord:
    return JobRecord(job_id=job_id, tenant="t", state=QUEUED, display_filename="x.mp4", size_bytes=1, sha256="0" * 64,
                     options=canonical_options(common_pb2.JobOptions()), input_name="input.mp4",
                     video=common_pb2.VideoInfo(), create_us=now_us())


@pytest.fixture
async def store(tmp_path):
    from gateway.jobs import UploadRecord

    s = SqliteJobStore(tmp_path / "store.sqlite3", job_retention_s=60)
    job = _job()
    await s.insert_upload(UploadRecord(upload_id=job.job_id, tenant="t", request_id="", display_filename="x.mp4", size_bytes=1,
                                 declared_sha256="", options=job.options, committed_bytes=0, create_us=job.create_us,
                                 expire_us=job.create_us + 1))
    await s.create_job_from_upload(job.job_id, job)
    yield s
    await s.close()


async def test_transitions_follow_the_state_machine(store):
    job_id = "j-aaaaaaaaaaaaaaaaaaaa"
    assert await store.transition(job_id, SUCCEEDED) is None  # QUEUED cannot jump to SUCCEEDED
    assert (await store.transition(job_id, RUNNING)).state == RUNNING
    assert await store.transition(job_id, RUNNING) is None
    ended = await store.transition(job_id, FAILED, error=JobError("STAGE_FAILED", "boom", 1))
    assert ended.state == FAILED and ended.end_us and ended.expire_us > ended.end_us
    for state in (RUNNING, SUCCEEDED, CANCELLED, FAILED):
        assert await store.transition(job_id, state) is None  # nothing after a terminal state
    assert [e.seq for e in (await store.events_after(job_id, 0, 100))] == [1, 2, 3]
    assert (await store.get_job(job_id)).error == JobError("STAGE_FAILED", "boom", 1)


async def test_terminal_state_is_final_even_for_raw_sql(store, tmp_path):
    job_id = "j-aaaaaaaaaaaaaaaaaaaa"
    await store.transition(job_id, CANCELLED)
    with sqlite3.connect(tmp_path / "store.sqlite3") as db, pytest.raises(sqlite3.IntegrityError, match="terminal"):
        db.execute("UPDATE jobs SET state = 'RUNNING' WHERE job_id = ?", (job_id,))
    assert (await store.get_job(job_id)).state == CANCELLED


async def test_stage_events_only_for_running_jobs(store):
    job_id = "j-aaaaaaaaaaaaaaaaaaaa"
    event = gateway_pb2.JobEvent(type=gateway_pb2.JOB_EVENT_TYPE_STAGE_STARTED, stage=1)
    assert not await store.record_stage_event(job_id, event, 0.1)  # still QUEUED
    await store.transition(job_id, RUNNING)
    assert await store.record_stage_event(job_id, event, 0.1)
    assert (await store.get_job(job_id)).progress == pytest.approx(0.1)
