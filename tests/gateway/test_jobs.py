"""Jobs through the stages (fake stage servers over real gRPC): success, downloads, listing,
cancellation, deletion and every failure path ending in a terminal state with nothing left over."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.helpers import Client, rpc_error, sha256_of

SUCCEEDED, FAILED, CANCELLED = common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED
RUNNING = common_pb2.JOB_STATE_RUNNING


def job_dir(data_dir, job):
    return data_dir / "jobs" / job.name.removeprefix("jobs/")


def status_of(error: common_pb2.JobError) -> tuple[str, str, dict[str, str]]:
    """JobError.status as a client reads any mesh error: (code name, ErrorInfo reason, its
    metadata), checking that it says what the JobError's own fields say."""
    status = error.status
    assert status.message == error.message
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and info.domain == "mocapmesh.dev"
    return code_pb2.Code.Name(status.code), info.reason, dict(info.metadata)


async def test_job_succeeds_with_verified_artifacts_and_merged_quality(client, stages, runner_bytes, data_dir):
    job = await client.upload(runner_bytes, filename="runner_1080p.mp4")
    done = await client.wait(job.name)

    assert done.state == SUCCEEDED and done.progress == pytest.approx(1.0), done.error
    assert done.start_time.seconds and done.end_time.seconds and done.expire_time.seconds > done.end_time.seconds
    kinds = sorted(a.kind for a in done.artifacts)
    assert kinds == sorted([common_pb2.ARTIFACT_KIND_BVH, common_pb2.ARTIFACT_KIND_FBX, common_pb2.ARTIFACT_KIND_GLB,
                            common_pb2.ARTIFACT_KIND_PREVIEW, common_pb2.ARTIFACT_KIND_QUALITY_REPORT,
                            common_pb2.ARTIFACT_KIND_POSE_TRACKS])
    for artifact in done.artifacts:
        assert artifact.name == f"{job.name}/artifacts/{artifact.filename}"
        got, data = await client.download(artifact.name)
        assert got == artifact and len(data) == artifact.size_bytes and sha256_of(data) == artifact.sha256
    # The tracker got the whole video, the exporter the video for the preview.
    assert stages.tracker.digest == sha256_of(runner_bytes)
    assert stages.tracker.headers[-1].frame_count == 180 and stages.tracker.headers[-1].max_persons == 4
    assert stages.exporter.video_bytes == len(runner_bytes) and stages.exporter.headers[-1].name_stem == "runner_1080p"
    # Smoother figures and exporter figures are merged, also into the JSON report.
    track = done.quality.tracks[0]
    assert (track.jitter_before_mm, track.jitter_after_mm, track.foot_skate_mm) == (12.0, 3.0, 1.5)
    assert track.frames_tracked == 180 and len(track.joints) == 33 and done.quality.smoothing_method == "fake_filter"
    report = next(a for a in done.artifacts if a.kind == common_pb2.ARTIFACT_KIND_QUALITY_REPORT)
    assert json.loads((await client.download(report.name))[1])["tracks"][0]["footSkateMm"] == 1.5
    tracks_artifact = next(a for a in done.artifacts if a.kind == common_pb2.ARTIFACT_KIND_POSE_TRACKS)
    tracks = common_pb2.PoseTrackSet.FromString((await client.download(tracks_artifact.name))[1])
    assert len(tracks.tracks) == 1 and len(tracks.tracks[0].frames) == 180
    # Only the input and the artifacts remain.
    remaining = sorted(p.name for p in job_dir(data_dir, job).iterdir())
    assert remaining == ["artifacts", "input.mp4"]


async def test_events_tell_the_whole_story_in_order(client, runner_bytes):
    job = await client.upload(runner_bytes)
    await client.wait(job.name)
    events = await client.events(job.name)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    kinds = [(e.type, e.stage) for e in events if e.type != gateway_pb2.JOB_EVENT_TYPE_STAGE_PROGRESS]
    T = gateway_pb2
    assert kinds == [
        (T.JOB_EVENT_TYPE_STATE_CHANGED, 0), (T.JOB_EVENT_TYPE_STATE_CHANGED, 0),
        (T.JOB_EVENT_TYPE_STAGE_STARTED, 1), (T.JOB_EVENT_TYPE_STAGE_FINISHED, 1),
        (T.JOB_EVENT_TYPE_STAGE_STARTED, 2), (T.JOB_EVENT_TYPE_STAGE_FINISHED, 2),
        (T.JOB_EVENT_TYPE_STAGE_STARTED, 3), (T.JOB_EVENT_TYPE_STAGE_FINISHED, 3),
        (T.JOB_EVENT_TYPE_STATE_CHANGED, 0),
    ]
    assert [e.state for e in events if e.type == T.JOB_EVENT_TYPE_STATE_CHANGED] == [1, RUNNING, SUCCEEDED]
    assert events[-1].job.artifacts and events[0].job.name == job.name
    progress = [e for e in events if e.type == T.JOB_EVENT_TYPE_STAGE_PROGRESS and e.stage == 1]
    assert progress and progress[0].frames_total == 180 and progress[0].frames_done == 90


async def test_download_resumes_from_an_offset_and_checks_bounds(client, runner_bytes):
    job = await client.wait((await client.upload(runner_bytes)).name)
    artifact = max(job.artifacts, key=lambda a: a.size_bytes)
    _, whole = await client.download(artifact.name)
    first, tail = await client.download(artifact.name, offset=1000)
    assert first.sha256 == artifact.sha256 and whole[:1000] + tail == whole
    _, nothing = await client.download(artifact.name, offset=artifact.size_bytes)
    assert nothing == b""
    beyond = await rpc_error(client.download(artifact.name, offset=artifact.size_bytes + 1))
    assert beyond.code == grpc.StatusCode.OUT_OF_RANGE and beyond.reason == "OFFSET_OUT_OF_RANGE"
    missing = await rpc_error(client.download(f"{job.name}/artifacts/nope.bvh"))
    assert missing.code == grpc.StatusCode.NOT_FOUND
    escape = await rpc_error(client.download(f"{job.name}/artifacts/..%2F..%2Fgateway.sqlite3"))
    assert escape.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_large_download_is_chunked(start_gateway, stages, runner_bytes):
    gateway = await start_gateway()
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.wait((await client.upload(runner_bytes)).name)
        artifact = next(a for a in job.artifacts if a.kind == common_pb2.ARTIFACT_KIND_PREVIEW)
        sizes = [len(m.data) async for m in client.stub.DownloadArtifact(gateway_pb2.DownloadArtifactRequest(name=artifact.name))]
    assert artifact.size_bytes > 1024 * 1024 and max(sizes) == 1024 * 1024 and sum(sizes) == artifact.size_bytes


async def test_artifacts_only_for_succeeded_jobs(start_gateway, stages, runner_bytes):
    gateway = await start_gateway()
    stages.tracker.knobs.mode = "hang"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        await client.wait(job.name, {RUNNING})
        err = await rpc_error(client.download(f"{job.name}/artifacts/runner-person-1.bvh"))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and err.reason == "JOB_STATE"


async def test_list_jobs_pages_newest_first_and_filters(start_gateway, stages, runner_bytes):
    gateway = await start_gateway(max_active_jobs_per_tenant=10)
    stages.tracker.knobs.mode = "fail"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        names = []
        for persons in range(1, 6):
            job = await client.upload(runner_bytes, options=common_pb2.JobOptions(max_persons=persons))
            await client.wait(job.name)
            names.append(job.name)
        seen, token = [], ""
        while True:
            page = await client.stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=2, page_token=token))
            assert len(page.jobs) <= 2
            seen += [j.name for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        assert seen == names[::-1]
        failed = await client.stub.ListJobs(gateway_pb2.ListJobsRequest(state=FAILED))
        assert len(failed.jobs) == 5
        assert not (await client.stub.ListJobs(gateway_pb2.ListJobsRequest(state=SUCCEEDED))).jobs
        first = await client.stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=2))
        mixed = await rpc_error(client.stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=2, page_token=first.next_page_token,
                                                                                 state=SUCCEEDED)))
        garbage = await rpc_error(client.stub.ListJobs(gateway_pb2.ListJobsRequest(page_token="not-a-token")))
        negative = await rpc_error(client.stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=-1)))
        unknown_state = await rpc_error(client.stub.ListJobs(gateway_pb2.ListJobsRequest(state=42)))
    for err, field in ((mixed, "page_token"), (garbage, "page_token"), (negative, "page_size"), (unknown_state, "state")):
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0].field == field


async def test_cancel_mid_stage_reaches_the_stage_and_ends_cancelled(start_gateway, stages, runner_bytes, data_dir):
    gateway = await start_gateway()
    stages.exporter.knobs.mode = "hang"  # tracks exist on disk while the exporter hangs
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        assert await asyncio.to_thread(stages.exporter.knobs.started.wait, 30)
        assert (job_dir(data_dir, job) / "tracks.smooth.pb").exists()
        cancelled = await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=job.name))
        assert cancelled.state == CANCELLED and cancelled.error.reason == "CANCELLED"
        assert cancelled.error.stage == common_pb2.JOB_STAGE_UNSPECIFIED
        assert status_of(cancelled.error) == ("CANCELLED", "CANCELLED", {})
        assert await asyncio.to_thread(stages.exporter.knobs.cancelled.wait, 10)  # the stage saw the cancel
        # Cancelling an ended job returns it unchanged; the events end with CANCELLED.
        again = await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=job.name))
        assert again.state == CANCELLED and again.update_time == cancelled.update_time
        events = await client.events(job.name)
    assert events[-1].state == CANCELLED
    assert sorted(p.name for p in job_dir(data_dir, job).iterdir()) == ["input.mp4"]


async def test_cancel_a_queued_job(start_gateway, stages, runner_bytes):
    gateway = await start_gateway(max_running_jobs=1, max_active_jobs_per_tenant=10)
    stages.tracker.knobs.mode = "hang"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        running = await client.upload(runner_bytes)
        await client.wait(running.name, {RUNNING})
        queued = await client.upload(runner_bytes, options=common_pb2.JobOptions(max_persons=1))
        assert (await client.get(queued.name)).state == common_pb2.JOB_STATE_QUEUED
        cancelled = await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=queued.name))
        assert cancelled.state == CANCELLED
        await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=running.name))
    assert stages.tracker.knobs.calls == 1  # the cancelled queued job never reached a stage


async def test_delete_removes_the_files_and_only_for_ended_jobs(start_gateway, stages, runner_bytes, data_dir):
    gateway = await start_gateway()
    stages.tracker.knobs.mode = "hang"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes, request_id="del-1")
        await client.wait(job.name, {RUNNING})
        busy = await rpc_error(client.stub.DeleteJob(gateway_pb2.DeleteJobRequest(name=job.name)))
        assert busy.code == grpc.StatusCode.FAILED_PRECONDITION and busy.reason == "JOB_STATE"
        await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=job.name))
        await client.stub.DeleteJob(gateway_pb2.DeleteJobRequest(name=job.name))
        assert not job_dir(data_dir, job).exists()
        gone = await rpc_error(client.get(job.name))
        assert gone.code == grpc.StatusCode.NOT_FOUND
        # The request_id is free again.
        stages.tracker.knobs.mode = "ok"
        fresh = await client.upload(runner_bytes, request_id="del-1")
    assert fresh.name != job.name


async def test_malformed_names_are_invalid(client):
    for name in ("", "jobs/", "jobs/../x", "j-aaaaaaaaaaaaaaaaaaaa", "jobs/j-AAAAAAAAAAAAAAAAAAAA"):
        err = await rpc_error(client.get(name))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0].field == "name"
    missing = await rpc_error(client.get("jobs/j-aaaaaaaaaaaaaaaaaaaa"))
    assert missing.code == grpc.StatusCode.NOT_FOUND


async def test_stage_down_fails_with_stage_unavailable_after_the_retry_budget(start_gateway, stages, runner_bytes, data_dir):
    gateway = await start_gateway(**stages.config_overrides(absent=("smoother",)), stage_attempts=3)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.wait((await client.upload(runner_bytes)).name, timeout_s=60)
        events = await client.events(job.name)
    assert job.state == FAILED and job.error.reason == "STAGE_UNAVAILABLE" and job.stage == common_pb2.JOB_STAGE_SMOOTH
    assert "smoother" in job.error.message and "3 attempts" in job.error.message
    assert status_of(job.error) == ("UNAVAILABLE", "STAGE_UNAVAILABLE", {"stage": "SMOOTH"})
    assert events[-1].state == FAILED and events[-1].job.error.status == job.error.status  # the event carries it too
    retries = [e for e in events if e.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY]
    assert len(retries) == 2 and all(e.stage == common_pb2.JOB_STAGE_SMOOTH for e in retries)
    assert sorted(p.name for p in job_dir(data_dir, job).iterdir()) == ["input.mp4"]  # tracks.raw.pb removed


@pytest.mark.parametrize(("stage", "mode", "reason", "failed_stage", "text", "code"), [
    ("tracker", "fail", "STAGE_FAILED", common_pb2.JOB_STAGE_TRACK, "could not decode frame 12", "UNKNOWN"),
    ("tracker", "no_person", "NO_PERSON", common_pb2.JOB_STAGE_TRACK, "no person", "FAILED_PRECONDITION"),
    ("smoother", "fail", "STAGE_FAILED", common_pb2.JOB_STAGE_SMOOTH, "BAD_TRACKS", "UNKNOWN"),
    ("exporter", "fail", "STAGE_FAILED", common_pb2.JOB_STAGE_EXPORT, "UNSOLVABLE", "UNKNOWN"),
    ("exporter", "corrupt", "STAGE_FAILED", common_pb2.JOB_STAGE_EXPORT, "corrupt", "UNKNOWN"),
])
async def test_stage_failures_end_the_job_failed_and_clean(start_gateway, stages, runner_bytes, data_dir,
                                                            stage, mode, reason, failed_stage, text, code):
    gateway = await start_gateway()
    getattr(stages, stage).knobs.mode = mode
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.wait((await client.upload(runner_bytes)).name)
    assert job.state == FAILED and job.error.reason == reason and job.stage == failed_stage
    assert job.error.stage == failed_stage and text in job.error.message
    # GetJob's error is also a google.rpc.Status shaped like the mesh's RPC errors.
    stage_name = common_pb2.JobStage.Name(failed_stage).removeprefix("JOB_STAGE_")
    assert status_of(job.error) == (code, reason, {"stage": stage_name})
    assert "/var/lib" not in job.error.message  # a stage's server paths are not passed on
    assert not job.artifacts
    assert sorted(p.name for p in job_dir(data_dir, job).iterdir()) == ["input.mp4"]


async def test_stage_deadline_fails_with_stage_timeout(start_gateway, stages, runner_bytes):
    gateway = await start_gateway(track_timeout_s=1.0)
    stages.tracker.knobs.mode = "hang"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.wait((await client.upload(runner_bytes)).name, timeout_s=30)
    assert job.state == FAILED and job.error.reason == "STAGE_TIMEOUT" and job.stage == common_pb2.JOB_STAGE_TRACK
    assert status_of(job.error) == ("DEADLINE_EXCEEDED", "STAGE_TIMEOUT", {"stage": "TRACK"})
    assert await asyncio.to_thread(stages.tracker.knobs.cancelled.wait, 10)


async def test_large_tracks_go_through_smooth_stream(start_gateway, stages, runner_bytes):
    gateway = await start_gateway(smooth_unary_max_bytes=1)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.wait((await client.upload(runner_bytes)).name)
    assert job.state == SUCCEEDED and stages.smoother.stream_calls == 1


async def test_per_stage_concurrency_limit(start_gateway, stages, runner_bytes):
    gateway = await start_gateway(track_concurrency=1, max_running_jobs=2)
    stages.tracker.knobs.mode = "hang"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        first = await client.upload(runner_bytes)
        second = await client.upload(runner_bytes, options=common_pb2.JobOptions(max_persons=1))
        await client.wait(first.name, {RUNNING})
        await client.wait(second.name, {RUNNING})
        await asyncio.sleep(0.5)
        assert stages.tracker.knobs.calls == 1  # both jobs run, one Track call at a time
        stages.tracker.knobs.mode = "ok"
        await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=first.name))
        assert (await client.wait(second.name)).state == SUCCEEDED
    assert stages.tracker.knobs.calls == 2
