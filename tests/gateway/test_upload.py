"""CreateJob / GetUpload through the real gRPC surface: round trip, idempotency, resume, limits."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mocap.v1 import common_pb2, gateway_pb2
from tests.gateway.helpers import Client, chunks, db_rows, header, job_dirs, rpc_error, sha256_of
from tests.media_shapes import write_h264_mp4
from tests.support import STREET_AVI, shared_file


async def test_runner_round_trips_byte_identical_and_is_probed(client, runner_bytes, data_dir):
    job = await client.upload(runner_bytes, filename="runner_1080p.mp4")

    assert job.name.startswith("jobs/j-") and job.state == common_pb2.JOB_STATE_QUEUED
    assert job.sha256 == sha256_of(runner_bytes) and job.size_bytes == len(runner_bytes)
    assert (job.video.frame_count, job.video.width, job.video.height) == (180, 1920, 1088)
    assert job.video.codec == "h264" and job.video.fps == pytest.approx(30.0)
    assert job.video.duration_seconds == pytest.approx(6.0)
    assert job.display_filename == "runner_1080p.mp4"
    # Defaults are filled in: every format, STANDARD smoothing, 4 persons, PATH root motion.
    assert list(job.options.formats) == [1, 2, 3] and job.options.smoothing == common_pb2.SMOOTHING_PRESET_STANDARD
    assert job.options.max_persons == 4 and job.options.root_motion == common_pb2.ROOT_MOTION_PATH
    stored = data_dir / "jobs" / job.name.removeprefix("jobs/") / "input.mp4"
    assert stored.read_bytes() == runner_bytes  # the extension comes from the probe, the bytes are exact


async def test_second_container_is_probed_too(client):
    data = shared_file(STREET_AVI).read_bytes()  # an MP4 named .avi: the probe, not the name, decides
    job = await client.upload(data, filename="street_720p.avi")
    assert (job.video.frame_count, job.video.width, job.video.height) == (205, 1280, 720)
    assert job.video.container.startswith("mov,mp4")


async def test_repeated_request_id_returns_the_first_job(client, runner_bytes, data_dir):
    first = await client.upload(runner_bytes, request_id="req-1")
    again = await client.upload(runner_bytes, request_id="req-1")
    # The server may answer from the header alone: a retry that sends only the header works too.
    header_only = await client.send([header(runner_bytes, request_id="req-1")])
    assert again.name == first.name == header_only.name
    assert job_dirs(data_dir) == [first.name.removeprefix("jobs/")]


async def test_request_id_reused_for_other_content_or_options_is_refused(client, runner_bytes):
    await client.upload(runner_bytes, request_id="req-2")
    other_options = await rpc_error(client.upload(runner_bytes, request_id="req-2",
                                                  options=common_pb2.JobOptions(max_persons=2)))
    other_bytes = runner_bytes[:-1] + b"\x00"
    other_content = await rpc_error(client.upload(other_bytes, request_id="req-2"))
    for err in (other_options, other_content):
        assert err.code == grpc.StatusCode.ALREADY_EXISTS and err.reason == "REQUEST_ID_REUSED"


async def test_same_content_and_options_return_the_existing_job(client, runner_bytes, data_dir):
    first = await client.upload(runner_bytes)
    by_declared_sha = await client.upload(runner_bytes)  # answered from the header's sha256
    by_computed_sha = await client.upload(runner_bytes, sha256="")  # found after hashing the bytes
    explicit_defaults = await client.upload(runner_bytes, options=common_pb2.JobOptions(
        formats=[common_pb2.OUTPUT_FORMAT_GLB, common_pb2.OUTPUT_FORMAT_BVH, common_pb2.OUTPUT_FORMAT_FBX],
        smoothing=common_pb2.SMOOTHING_PRESET_STANDARD, max_persons=4))
    assert first.name == by_declared_sha.name == by_computed_sha.name == explicit_defaults.name
    assert job_dirs(data_dir) == [first.name.removeprefix("jobs/")]  # the duplicates' bytes are gone
    assert db_rows(data_dir)["jobs"] == 1 and db_rows(data_dir)["uploads"] == 0

    different = await client.upload(runner_bytes, options=common_pb2.JobOptions(skip_preview=True))
    assert different.name != first.name


async def test_duplicate_of_a_failed_job_makes_a_new_job(start_gateway, stages, runner_bytes):
    gateway = await start_gateway()
    stages.tracker.knobs.mode = "fail"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        first = await client.upload(runner_bytes)
        assert (await client.wait(first.name)).state == common_pb2.JOB_STATE_FAILED
        second = await client.upload(runner_bytes)
    assert second.name != first.name


async def test_duplicate_of_a_job_whose_artifacts_are_gone_makes_a_new_job(client, stages, runner_bytes, data_dir):
    first = await client.upload(runner_bytes)
    done = await client.wait(first.name)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.artifacts
    artifacts_dir = data_dir / "jobs" / first.name.removeprefix("jobs/") / "artifacts"
    (artifacts_dir / done.artifacts[0].name.rsplit("/", 1)[1]).unlink()  # e.g. a disk cleaned by hand

    by_declared_sha = await client.upload(runner_bytes)  # answered from the header: must not be `first`
    assert by_declared_sha.name != first.name
    assert (await client.wait(by_declared_sha.name)).state == common_pb2.JOB_STATE_SUCCEEDED
    again = await client.upload(runner_bytes, sha256="")  # found after hashing: the new, deliverable job
    assert again.name == by_declared_sha.name


async def _break_after(client: Client, messages: list[gateway_pb2.CreateJobRequest]) -> None:
    """Sends `messages`, then breaks the stream the way a dropped client does (cancel)."""
    sent = asyncio.Event()

    async def stream():
        for m in messages:
            yield m
        sent.set()
        await asyncio.Event().wait()

    call = client.stub.CreateJob(stream(), metadata=client.metadata)
    await sent.wait()
    await asyncio.sleep(0.2)  # let the last chunks reach the server
    call.cancel()


async def _committed(client: Client, request_id: str, expected: int | None = None) -> gateway_pb2.Upload:
    for _ in range(200):
        upload = await client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id=request_id), metadata=client.metadata)
        if expected is None or upload.committed_bytes == expected:
            return upload
        await asyncio.sleep(0.05)
    raise AssertionError(f"upload never reached {expected} committed bytes")


async def test_broken_upload_resumes_to_a_byte_identical_file(client, runner_bytes, data_dir):
    step = 256 * 1024
    parts = chunks(runner_bytes, size=step)
    await _break_after(client, [header(runner_bytes, request_id="resume-1"), *parts[:3]])

    upload = await _committed(client, "resume-1", expected=3 * step)
    assert upload.state == gateway_pb2.UPLOAD_STATE_ACTIVE and upload.size_bytes == len(runner_bytes)
    assert upload.expire_time.seconds > 0
    # The upload is a resource too: its name finds it as well as its request_id does.
    assert upload.name.startswith("uploads/j-") and upload.request_id == "resume-1"
    assert await client.stub.GetUpload(gateway_pb2.GetUploadRequest(name=upload.name)) == upload
    for both_or_neither in (gateway_pb2.GetUploadRequest(request_id="resume-1", name=upload.name),
                            gateway_pb2.GetUploadRequest()):
        refused = await rpc_error(client.stub.GetUpload(both_or_neither))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.violations
    for bad, code in (("jobs/" + upload.name.removeprefix("uploads/"), grpc.StatusCode.INVALID_ARGUMENT),
                      ("uploads/j-aaaaaaaaaaaaaaaaaaaa", grpc.StatusCode.NOT_FOUND)):
        assert (await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(name=bad)))).code == code
    # Resuming from anywhere but the committed offset is refused, naming the right offset.
    wrong = await rpc_error(client.send([header(runner_bytes, request_id="resume-1", resume_offset=step)]))
    assert wrong.code == grpc.StatusCode.FAILED_PRECONDITION and wrong.reason == "UPLOAD_OFFSET_MISMATCH"
    assert wrong.metadata["committed_bytes"] == str(3 * step)

    job = await client.send([header(runner_bytes, request_id="resume-1", resume_offset=3 * step),
                             *chunks(runner_bytes, start=3 * step, size=step)])
    assert job.sha256 == sha256_of(runner_bytes)
    assert (data_dir / "jobs" / job.name.removeprefix("jobs/") / "input.mp4").read_bytes() == runner_bytes
    done = await client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="resume-1"))
    assert done.state == gateway_pb2.UPLOAD_STATE_COMPLETE and done.job == job.name
    assert done.name == upload.name and await client.stub.GetUpload(gateway_pb2.GetUploadRequest(name=done.name)) == done


async def test_interrupted_upload_survives_a_gateway_restart(start_gateway, runner_bytes, data_dir):
    first = await start_gateway()
    async with Client(f"127.0.0.1:{first.port}") as client:
        await _break_after(client, [header(runner_bytes, request_id="resume-2"), *chunks(runner_bytes, size=500_000)[:2]])
        await _committed(client, "resume-2", expected=1_000_000)
    await first.stop()
    second = await start_gateway()
    async with Client(f"127.0.0.1:{second.port}") as client:
        upload = await _committed(client, "resume-2")
        assert upload.committed_bytes == 1_000_000
        job = await client.send([header(runner_bytes, request_id="resume-2", resume_offset=upload.committed_bytes),
                                 *chunks(runner_bytes, start=upload.committed_bytes)])
    assert job.sha256 == sha256_of(runner_bytes)


async def test_a_second_stream_for_a_live_upload_is_told_to_wait(client, runner_bytes):
    sent, release = asyncio.Event(), asyncio.Event()

    async def stream():
        yield header(runner_bytes, request_id="busy-1")
        yield chunks(runner_bytes)[0]
        sent.set()
        await release.wait()

    call = client.stub.CreateJob(stream())
    await sent.wait()
    await asyncio.sleep(0.2)
    busy = await rpc_error(client.send([header(runner_bytes, request_id="busy-1")]))
    assert busy.code == grpc.StatusCode.ABORTED and busy.reason == "UPLOAD_IN_PROGRESS" and busy.retry_after_s
    call.cancel()


async def test_restarting_an_upload_from_zero_replaces_the_partial(client, runner_bytes, data_dir):
    await _break_after(client, [header(runner_bytes, request_id="restart-1"), *chunks(runner_bytes)[:1]])
    await _committed(client, "restart-1", expected=1024 * 1024)
    job = await client.upload(runner_bytes, request_id="restart-1")
    assert job.sha256 == sha256_of(runner_bytes)
    assert (data_dir / "jobs" / job.name.removeprefix("jobs/") / "input.mp4").read_bytes() == runner_bytes


async def test_get_upload_of_an_unknown_request_is_not_found(client):
    err = await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="never-seen")))
    assert err.code == grpc.StatusCode.NOT_FOUND
    bad = await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="no spaces")))
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and bad.violations[0].field == "request_id"


async def test_active_jobs_per_tenant_are_limited(start_gateway, stages, runner_bytes):
    gateway = await start_gateway(max_active_jobs_per_tenant=1)
    stages.tracker.knobs.mode = "hang"
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        job = await client.upload(runner_bytes)
        err = await rpc_error(client.upload(runner_bytes, options=common_pb2.JobOptions(max_persons=1)))
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "TOO_MANY_ACTIVE_JOBS"
        assert err.retry_after_s and err.retry_after_s > 0
        await client.stub.CancelJob(gateway_pb2.CancelJobRequest(name=job.name))
        assert (await client.upload(runner_bytes, options=common_pb2.JobOptions(max_persons=1))).name != job.name


async def test_uploads_are_refused_when_the_disk_is_short(start_gateway, runner_bytes, data_dir):
    gateway = await start_gateway(min_free_bytes=2**62)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        err = await rpc_error(client.upload(runner_bytes))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "INSUFFICIENT_STORAGE" and err.retry_after_s
    assert job_dirs(data_dir) == []


@pytest.mark.parametrize(("limit", "reason"), [
    ({"max_duration_s": 5.0}, "VIDEO_TOO_LONG"),
    ({"max_frame_pixels": 1280 * 720}, "RESOLUTION_TOO_HIGH"),
    ({"max_aspect_ratio": 1.5}, "UNSUPPORTED_ASPECT_RATIO"),  # runner is 1920×1088 = 1.76:1
])
async def test_video_limits(start_gateway, runner_bytes, data_dir, limit, reason):
    gateway = await start_gateway(**limit)
    async with Client(f"127.0.0.1:{gateway.port}") as client:
        err = await rpc_error(client.upload(runner_bytes))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == reason and err.violations
    assert job_dirs(data_dir) == [] and db_rows(data_dir) == {"jobs": 0, "uploads": 0, "events": 0, "artifacts": 0}


@pytest.mark.parametrize(("width", "height"), [(16000, 16), (16, 16000)])
async def test_sliver_frames_are_refused_by_the_default_aspect_limit(client, tmp_path, data_dir, width, height):
    """A 16000×16 clip is well under the pixel limit, yet it held the tracker for minutes."""
    data = write_h264_mp4(tmp_path / "sliver.mp4", width, height).read_bytes()
    err = await rpc_error(client.upload(data, filename="sliver.mp4"))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_ASPECT_RATIO"), str(err)
    assert f"{width}×{height}" in err.message and "4:1" in err.message
    assert [v.field for v in err.violations] == ["chunk.data"]
    assert job_dirs(data_dir) == [] and db_rows(data_dir) == {"jobs": 0, "uploads": 0, "events": 0, "artifacts": 0}


@pytest.mark.parametrize(("width", "height"), [(1280, 360), (360, 1280), (1024, 256)])  # 32:9 both ways, 4:1
async def test_panoramas_pass_the_default_aspect_limit(client, tmp_path, width, height):
    data = write_h264_mp4(tmp_path / "wide.mp4", width, height, frames=3).read_bytes()
    job = await client.upload(data, filename="wide.mp4")
    assert (job.video.width, job.video.height) == (width, height)
