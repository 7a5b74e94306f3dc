"""Only an upload somebody can resume is kept: one with a request_id and at least one byte. An
upload without a request_id (nobody can ask for it again) or with nothing in it is removed, row and
directory: when its stream ends early while the gateway lives, and at the next start's sweep when a
gateway was killed (-9) in the middle of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from mocap.v1 import gateway_pb2
from tests.gateway.helpers import Client, database_url, store_flags, chunks, db_rows, header, job_dirs, rpc_error, sha256_of
from tests.support import ServiceProcess

pytestmark = pytest.mark.timeout(120)

STEP = 256 * 1024


# With a shared (PostgreSQL) store a restarted gateway cannot know that the uploads the killed one
# streamed are dead until their stream leases lapse; a short TTL keeps that wait short here.
SHARED_STORE_TTL_S = 1.0


def _gateway(data_dir: Path, stages, log: Path) -> ServiceProcess:
    ttl = ["--job-claim-ttl-s", str(SHARED_STORE_TTL_S)] if database_url() else []
    return ServiceProcess("gateway", ["--data-dir", str(data_dir), *store_flags(), *ttl, "--min-free-bytes", "0",
                                      "--grace-seconds", "2", "--upload-commit-bytes", str(STEP), *stages.flags()],
                          log_path=log)


def _open_stream(client: Client, messages: list[gateway_pb2.CreateJobRequest]) -> tuple[object, asyncio.Event]:
    """Starts a CreateJob that sends `messages` and then stays open (no half-close)."""
    sent = asyncio.Event()

    async def stream():
        for message in messages:
            yield message
        sent.set()
        await asyncio.Event().wait()

    return client.stub.CreateJob(stream(), timeout=60), sent


def _part_sizes(data_dir: Path) -> list[int]:
    return sorted(p.stat().st_size for p in (data_dir / "jobs").glob("*/upload.part"))


async def test_a_gateway_killed_mid_upload_leaves_only_resumable_uploads_after_its_restart(
        stages, runner_bytes, data_dir, tmp_path, start_gateway):
    most = len(runner_bytes) - 100_000  # 1.9 MB of the 2.0 MB clip
    first = await asyncio.to_thread(_gateway(data_dir, stages, tmp_path / "gateway.log").start)
    try:
        async with Client(first.address) as client:
            calls = [
                _open_stream(client, [header(runner_bytes), *chunks(runner_bytes, size=STEP)][: 1 + most // STEP]),
                _open_stream(client, [header(runner_bytes, request_id="keep-1"),
                                      *chunks(runner_bytes, size=STEP)][: 1 + most // STEP]),
                _open_stream(client, [header(runner_bytes, request_id="empty-1")]),  # a header, not one byte
            ]
            for _, sent in calls:
                await sent.wait()
            for _ in range(200):  # until every byte sent is in the partial files
                if _part_sizes(data_dir) == [0, STEP * (most // STEP), STEP * (most // STEP)]:
                    break
                await asyncio.sleep(0.05)
            assert _part_sizes(data_dir) == [0, STEP * (most // STEP), STEP * (most // STEP)]
            await asyncio.to_thread(first.kill)  # -9 in the middle of three uploads
            for call, _ in calls:
                call.cancel()
    finally:
        await asyncio.to_thread(first.stop)
    assert db_rows(data_dir)["uploads"] == 3 and len(job_dirs(data_dir)) == 3  # what the crash left

    if not database_url():
        second = await start_gateway()  # its startup sweep runs before it serves
    else:  # the killed gateway's stream leases lapse first; then the periodic cleanup removes them
        second = await start_gateway(job_claim_ttl_s=SHARED_STORE_TTL_S, retention_interval_s=0.2)
        for _ in range(200):
            if db_rows(data_dir)["uploads"] == 1:
                break
            await asyncio.sleep(0.05)
    assert db_rows(data_dir)["uploads"] == 1 and len(job_dirs(data_dir)) == 1
    async with Client(f"127.0.0.1:{second.port}") as client:
        kept = await client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="keep-1"))
        assert kept.state == gateway_pb2.UPLOAD_STATE_ACTIVE and kept.committed_bytes > 0
        gone = await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="empty-1")))
        assert gone.code == grpc.StatusCode.NOT_FOUND
        # The resumable one still resumes to the very bytes.
        job = await client.send([header(runner_bytes, request_id="keep-1", resume_offset=kept.committed_bytes),
                                 *chunks(runner_bytes, start=kept.committed_bytes, size=STEP)])
    assert job.sha256 == sha256_of(runner_bytes)
    assert job_dirs(data_dir) == [job.name.removeprefix("jobs/")] and db_rows(data_dir)["uploads"] == 1


@pytest.mark.parametrize("how", ["cancel", "deadline", "short"])
async def test_a_stream_without_request_id_that_ends_early_leaves_nothing(client, runner_bytes, data_dir, how):
    messages = [header(runner_bytes), *chunks(runner_bytes, size=STEP)[:3]]
    if how == "short":  # the client half-closes after 3 of its chunks
        refused = await rpc_error(client.send(messages))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.reason == "SIZE_MISMATCH"
    elif how == "deadline":  # the client's deadline passes mid-upload
        failed = await rpc_error(client.stub.CreateJob(_stay_open(messages), timeout=1.0))
        assert failed.code == grpc.StatusCode.DEADLINE_EXCEEDED
    else:  # the client cancels mid-upload
        call, sent = _open_stream(client, messages)
        await sent.wait()
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    for _ in range(100):
        if db_rows(data_dir)["uploads"] == 0 and job_dirs(data_dir) == []:
            break
        await asyncio.sleep(0.05)
    assert db_rows(data_dir)["uploads"] == 0 and job_dirs(data_dir) == []


async def _stay_open(messages: list[gateway_pb2.CreateJobRequest]):
    for message in messages:
        yield message
    await asyncio.Event().wait()


async def test_a_broken_stream_with_a_request_id_but_no_byte_leaves_nothing(client, runner_bytes, data_dir):
    call, sent = _open_stream(client, [header(runner_bytes, request_id="nothing-1")])
    await sent.wait()
    for _ in range(100):  # the upload is streaming: its row and directory exist
        if db_rows(data_dir)["uploads"] == 1:
            break
        await asyncio.sleep(0.02)
    call.cancel()
    for _ in range(100):
        if db_rows(data_dir)["uploads"] == 0 and job_dirs(data_dir) == []:
            break
        await asyncio.sleep(0.05)
    assert db_rows(data_dir)["uploads"] == 0 and job_dirs(data_dir) == []
    gone = await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="nothing-1")))
    assert gone.code == grpc.StatusCode.NOT_FOUND
