"""WatchJob resumes without gaps or duplicates (also across a gateway restart), slow watchers block
no one, and a gateway killed with -9 (or stopped) resumes its running jobs at its next start after
their last finished stage, leaving no intermediate file behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest

from gateway.events import EventHub, watch
from gateway.jobs import QUEUED, JobRecord, UploadRecord, canonical_options, now_us
from gateway.retention import ORPHAN_MIN_AGE_S
from gateway.store import SqliteJobStore
from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.fakes import FakeStages
from tests.gateway.helpers import Client, store_flags, db_rows, job_dirs, rpc_error
from tests.support import ServiceProcess

T = gateway_pb2
SUCCEEDED, FAILED = common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED


async def _read_rest(call) -> list[gateway_pb2.JobEvent]:
    """The remaining messages of a stream read with read() (iteration may not be mixed in)."""
    got = []
    while (message := await call.read()) is not grpc.aio.EOF:
        got.append(message)
    return got


def _contiguous(events: list[gateway_pb2.JobEvent], start: int = 1) -> bool:
    return [e.seq for e in events] == list(range(start, start + len(events)))


async def test_watch_resumes_after_seq_with_no_gap_and_no_duplicate(client, stages, runner_bytes):
    stages.tracker.knobs.gate.clear()  # the job stops inside Track until the gate opens
    job = await client.upload(runner_bytes)
    head = await client.events(job.name, limit=4)  # QUEUED, RUNNING, STAGE_STARTED, first progress
    assert _contiguous(head) and head[-1].type == T.JOB_EVENT_TYPE_STAGE_PROGRESS
    stages.tracker.knobs.gate.set()
    tail = await client.events(job.name, after_seq=head[-1].seq)  # the stream ends after the terminal event
    everything = await client.events(job.name)

    assert _contiguous(head + tail) and head + tail == everything
    assert tail[-1].type == T.JOB_EVENT_TYPE_STATE_CHANGED and tail[-1].state == SUCCEEDED
    assert await client.events(job.name, after_seq=tail[-1].seq) == []  # nothing after the end
    mid = await client.events(job.name, after_seq=5)
    assert mid == everything[5:]


async def test_a_slow_watcher_blocks_neither_the_pipeline_nor_other_watchers(client, stages, runner_bytes):
    stages.tracker.knobs.gate.clear()
    job = await client.upload(runner_bytes)
    slow = client.stub.WatchJob(T.WatchJobRequest(name=job.name))
    first = await slow.read()  # then it reads nothing more while the job runs to its end
    stages.tracker.knobs.gate.set()
    done = await client.wait(job.name)
    others = await client.events(job.name)
    assert done.state == SUCCEEDED and first.seq == 1 and others[-1].state == SUCCEEDED
    rest = await _read_rest(slow)  # the slow watcher still gets everything, in order
    assert [first, *rest] == others


async def test_progress_events_are_throttled(client, stages, runner_bytes):
    stages.tracker.knobs.mode = "chatty"  # 2000 progress messages as fast as it can
    job = await client.wait((await client.upload(runner_bytes)).name)
    events = await client.events(job.name)
    track = [e for e in events if e.type == T.JOB_EVENT_TYPE_STAGE_PROGRESS and e.stage == common_pb2.JOB_STAGE_TRACK]
    span_s = (track[-1].time.ToNanoseconds() - track[0].time.ToNanoseconds()) / 1e9 if track else 0.0
    assert job.state == SUCCEEDED and 1 <= len(track) <= 4 * span_s + 2  # at most ~4 per second and stage


async def test_watch_validates_its_request(client):
    bad = await rpc_error(client.events("jobs/j-aaaaaaaaaaaaaaaaaaaa", after_seq=-1))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT
    missing = await rpc_error(client.events("jobs/j-aaaaaaaaaaaaaaaaaaaa"))
    assert missing.code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Real child processes: restart and kill -9


def _gateway(data_dir: Path, stages: FakeStages, log: Path, port: int | None = None) -> ServiceProcess:
    return ServiceProcess("gateway", ["--data-dir", str(data_dir), *store_flags(), "--min-free-bytes", "0", "--grace-seconds", "2",
                                      "--stage-retry-backoff-s", "0.05", *stages.flags()], log_path=log, port=port)


@pytest.fixture
async def gateway_process(data_dir, stages, tmp_path):
    started: list[ServiceProcess] = []

    async def start(port: int | None = None) -> ServiceProcess:
        process = _gateway(data_dir, stages, tmp_path / "gateway.log", port)
        await asyncio.to_thread(process.start)
        started.append(process)
        return process

    yield start
    for process in started:
        await asyncio.to_thread(process.stop)


async def test_kill_9_while_running_resumes_the_job_after_its_last_stage(gateway_process, stages, runner_bytes, data_dir):
    stages.exporter.knobs.mode = "hang"  # raw and smoothed tracks are on disk while it hangs
    first = await gateway_process()
    async with Client(first.address) as client:
        job = await client.upload(runner_bytes)
        assert await asyncio.to_thread(stages.exporter.knobs.started.wait, 60)
        seen = await client.events(job.name, limit=7)  # up to the export stage
        assert (await client.get(job.name)).state == common_pb2.JOB_STATE_RUNNING
    job_path = data_dir / "jobs" / job.name.removeprefix("jobs/")
    assert (job_path / "tracks.raw.pb").exists() and (job_path / "tracks.smooth.pb").exists()
    orphan = data_dir / "jobs" / "j-orphanorphanorphan22"
    orphan.mkdir()
    (orphan / "input.mp4").write_bytes(b"left by a crash")
    os.utime(orphan, (time.time() - ORPHAN_MIN_AGE_S - 1,) * 2)  # old enough for a shared store's sweep too

    await asyncio.to_thread(first.kill)
    stages.exporter.knobs.mode = "ok"
    second = await gateway_process(port=first.port)
    async with Client(second.address) as client:
        after = await client.wait(job.name)
        resumed = await client.events(job.name, after_seq=seen[-1].seq)
        everything = await client.events(job.name)

    # Resumed after its last finished stage: tracked and smoothed once, exported again.
    assert after.state == SUCCEEDED, after.error
    assert stages.tracker.knobs.calls == 1 and stages.smoother.knobs.calls == 1 and stages.exporter.knobs.calls == 2
    takeover = [e for e in resumed if e.type == T.JOB_EVENT_TYPE_RESUMED]
    assert len(takeover) == 1 and takeover[0].stage == common_pb2.JOB_STAGE_SMOOTH and takeover[0].attempt == 2
    assert sorted(p.name for p in job_path.iterdir()) == ["artifacts", "input.mp4"]  # tracks and temp files gone
    assert sorted(p.name for p in (job_path / "artifacts").iterdir()) == sorted(a.filename for a in after.artifacts)
    assert not orphan.exists() and job_dirs(data_dir) == [job.name.removeprefix("jobs/")]
    # The watcher resumes across the crash: every later event once, ending with the SUCCEEDED one.
    assert _contiguous(seen + resumed) and seen + resumed == everything
    assert resumed[-1].type == T.JOB_EVENT_TYPE_STATE_CHANGED and resumed[-1].state == SUCCEEDED


async def test_graceful_stop_hands_running_jobs_back_for_the_next_start(gateway_process, stages, runner_bytes, data_dir):
    stages.tracker.knobs.mode = "hang"
    first = await gateway_process()
    async with Client(first.address) as client:
        job = await client.upload(runner_bytes)
        await client.wait(job.name, {common_pb2.JOB_STATE_RUNNING})
    await asyncio.to_thread(first.stop)
    assert "Traceback" not in first.log_text()
    assert await asyncio.to_thread(stages.tracker.knobs.cancelled.wait, 10)  # the stage call was cancelled, not abandoned
    stages.tracker.knobs.mode = "ok"
    second = await gateway_process(port=first.port)
    async with Client(second.address) as client:
        after = await client.wait(job.name)
    assert after.state == SUCCEEDED and stages.tracker.knobs.calls == 2  # tracking had not finished: done again
    assert db_rows(data_dir)["jobs"] == 1


async def test_watch_across_a_graceful_restart(gateway_process, stages, runner_bytes):
    stages.tracker.knobs.gate.clear()
    first = await gateway_process()
    async with Client(first.address) as client:
        job = await client.upload(runner_bytes)
        call = client.stub.WatchJob(T.WatchJobRequest(name=job.name))
        seen = [await call.read() for _ in range(3)]
        await asyncio.to_thread(first.stop)  # the open watch stream is ended with UNAVAILABLE, not left hanging
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while (event := await call.read()) is not grpc.aio.EOF:
                seen.append(event)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    stages.tracker.knobs.gate.set()
    second = await gateway_process(port=first.port)
    async with Client(second.address) as client:
        rest = await client.events(job.name, after_seq=seen[-1].seq)
        everything = await client.events(job.name)
    assert _contiguous(seen + rest) and seen + rest == everything and rest[-1].state == SUCCEEDED
    assert any(e.type == T.JOB_EVENT_TYPE_RESUMED for e in rest)


class _EndsRightAfterAnEmptyRead(SqliteJobStore):
    """The real store, with the one interleaving that lost terminal events: the job ends (another
    task or replica writes SUCCEEDED) between a watcher's read of new events and its job lookup."""

    ended = False

    async def events_after(self, job_id: str, after_seq: int, limit: int) -> list[gateway_pb2.JobEvent]:
        events = await super().events_after(job_id, after_seq, limit)
        if not events and not self.ended:
            self.ended = True
            await self.transition(job_id, SUCCEEDED)
        return events


async def test_watch_delivers_a_terminal_event_written_between_its_reads(tmp_path):
    store = _EndsRightAfterAnEmptyRead(tmp_path / "store.sqlite3", job_retention_s=60)
    try:
        job = JobRecord(job_id="j-aaaaaaaaaaaaaaaaaaaa", tenant="t", state=QUEUED, display_filename="x.mp4", size_bytes=1,
                        sha256="0" * 64, options=canonical_options(common_pb2.JobOptions()), input_name="input.mp4",
                        video=common_pb2.VideoInfo(), create_us=now_us())
        await store.insert_upload(UploadRecord(upload_id=job.job_id, tenant="t", request_id="", display_filename="x.mp4",
                                               size_bytes=1, declared_sha256="", options=job.options, committed_bytes=0,
                                               create_us=job.create_us, expire_us=job.create_us + 1))
        await store.create_job_from_upload(job.job_id, job)
        assert await store.claim_job("gw", "token", now_us() + 10_000_000) is not None
        seen = [event async for event in watch(store, EventHub(), job.job_id, 0, poll_s=0.1)]
        assert [e.seq for e in seen] == [1, 2, 3] and seen[-1].state == SUCCEEDED
    finally:
        await store.close()
