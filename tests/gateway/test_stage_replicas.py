"""Stage replicas behind one address: the gateway balances its stage calls round robin over
every replica of a stage (`tracker_addr="ip:p1,ip:p2"`), and a replica that dies in the middle
of a call, after it had answered, costs the job a retry on another replica, not its life (the
call's partial output is thrown away and made again whole)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.fakes import FakeStages
from tests.gateway.helpers import Client, sha256_of

pytestmark = pytest.mark.timeout(120)

STAGES = ("tracker", "smoother", "exporter")


@pytest.fixture
def replica() -> Iterator[FakeStages]:
    """A second replica of every stage, next to the `stages` fixture's."""
    fakes = FakeStages()
    yield fakes
    fakes.stop()


def _both(first: FakeStages, second: FakeStages) -> dict[str, str]:
    """Gateway settings that list both replicas of every stage as one comma list."""
    return {f"{name}_addr": f"{first.addresses[name]},{second.addresses[name]}" for name in STAGES}


async def _first_paused(replicas: tuple[FakeStages, FakeStages], name: str, limit_s: float = 30.0) -> FakeStages:
    """The replica whose `name` fake got the call and waits at its gate, having responded."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for fakes in replicas:
            if getattr(fakes, name).knobs.paused.is_set():
                return fakes
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {name} replica got the call within {limit_s} s")


async def _progress_seen(client: Client, job: str, stage: int) -> None:
    """Waits until the job recorded progress of `stage`: the gateway has the stage's answer."""
    call = client.stub.WatchJob(gateway_pb2.WatchJobRequest(name=job), metadata=client.metadata, timeout=30)
    async for event in call:
        if event.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_PROGRESS and event.stage == stage:
            call.cancel()
            return
    raise AssertionError(f"the job ended without progress of stage {stage}")


async def _kill_mid_call(client: Client, job: str, replicas: tuple[FakeStages, FakeStages], name: str,
                         stage: int) -> tuple[FakeStages, FakeStages]:
    """Lets the job's `name` call reach one replica and answer, then stops that replica's server
    under the call; the other replica serves from then on. Returns (victim, survivor)."""
    victim = await _first_paused(replicas, name)
    survivor = replicas[1] if victim is replicas[0] else replicas[0]
    await _progress_seen(client, job, stage)
    getattr(survivor, name).knobs.gate.set()
    await asyncio.to_thread(victim.kill, name)
    return victim, survivor


def _retries(events: list[gateway_pb2.JobEvent]) -> list[gateway_pb2.JobEvent]:
    return [e for e in events if e.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY]


async def test_jobs_are_spread_over_every_replica_of_each_stage(start_gateway, stages, replica, runner_bytes):
    gateway = await start_gateway(**_both(stages, replica))
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        for persons in range(1, 7):  # other options each time: the same content and options would be one job
            job = await client.upload(runner_bytes, options=common_pb2.JobOptions(max_persons=persons))
            done = await client.wait(job.name)
            assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    for name in STAGES:
        calls = [getattr(fakes, name).knobs.calls for fakes in (stages, replica)]
        assert sum(calls) == 6 and min(calls) > 0, (name, calls)


async def test_a_tracker_replica_dying_mid_track_costs_a_retry_on_the_other(start_gateway, stages, replica, runner_bytes):
    for fakes in (stages, replica):
        fakes.tracker.knobs.gate.clear()  # Track waits at the gate after its first progress
    gateway = await start_gateway(**_both(stages, replica))
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        victim, survivor = await _kill_mid_call(client, job.name, (stages, replica), "tracker", common_pb2.JOB_STAGE_TRACK)
        done = await client.wait(job.name)
        events = await client.events(job.name)

    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
    retries = _retries(events)
    assert retries and all(e.stage == common_pb2.JOB_STAGE_TRACK for e in retries), retries
    assert retries[0].reason == "STAGE_UNAVAILABLE" and "tracker" in retries[0].message
    assert victim.tracker.knobs.calls == 1 and not victim.tracker.knobs.finished.is_set()
    assert survivor.tracker.knobs.calls == 1 and survivor.tracker.knobs.finished.is_set()  # the retried call
    assert survivor.tracker.digest == sha256_of(runner_bytes)  # it got the whole video again
    finished = [e.stage for e in events if e.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED]
    assert finished == [common_pb2.JOB_STAGE_TRACK, common_pb2.JOB_STAGE_SMOOTH, common_pb2.JOB_STAGE_EXPORT]


async def test_an_exporter_replica_dying_mid_export_leaves_correct_artifacts(start_gateway, stages, replica, runner_bytes,
                                                                           data_dir):
    for fakes in (stages, replica):
        fakes.exporter.knobs.gate.clear()  # Export waits at the gate with its first file half sent
    gateway = await start_gateway(**_both(stages, replica))
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        victim, survivor = await _kill_mid_call(client, job.name, (stages, replica), "exporter", common_pb2.JOB_STAGE_EXPORT)
        done = await client.wait(job.name)
        events = await client.events(job.name)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.error
        downloads = {a.filename: (a, await client.download(a.name)) for a in done.artifacts}

    retries = _retries(events)
    assert retries and all(e.stage == common_pb2.JOB_STAGE_EXPORT for e in retries), retries
    assert victim.exporter.knobs.calls == 1 and survivor.exporter.knobs.calls == 1
    assert survivor.exporter.knobs.finished.is_set()
    assert len(downloads) == len(done.artifacts)  # no file twice
    bvh = [a for a in done.artifacts if a.kind == common_pb2.ARTIFACT_KIND_BVH]
    assert len(bvh) == 1 and any(a.kind == common_pb2.ARTIFACT_KIND_PREVIEW for a in done.artifacts)
    for artifact, (got, data) in downloads.values():
        assert got == artifact and len(data) == artifact.size_bytes and sha256_of(data) == artifact.sha256, artifact.filename
    _, (_, body) = downloads[bvh[0].filename]
    assert body.startswith(b"bvh animation of person 1, ")  # made whole by the survivor
    job_id = job.name.rsplit("/", 1)[1]
    on_disk = sorted(p.name for p in (data_dir / "jobs" / job_id / "artifacts").iterdir())
    assert on_disk == sorted(downloads)  # the victim's half-written file is gone
