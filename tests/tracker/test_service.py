"""TrackerService through gRPC, with the tracker and the lease broker as real child processes:
video streamed in, poses streamed out, the inference lease held during the call and released on
every path (success, bad input, cancellation, lease loss)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from mocap.v1 import resource_pb2, resource_pb2_grpc, tracker_pb2, tracker_pb2_grpc
from mocap_common.rpc_errors import describe_rpc_error
from tests import damaged_media
from tests.media_shapes import write_h264_mp4
from tests.support import RUNNER_MP4, STREET_AVI, ServiceProcess, shared_file

CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broker")
    with ServiceProcess("resource_svc", ["--db-path", str(tmp / "leases.sqlite3")], log_path=tmp / "resource.log") as proc:
        yield proc


def _start_tracker(tmp, broker, *extra: str) -> ServiceProcess:
    return ServiceProcess(
        "tracker_svc", ["--spool-dir", str(tmp / "spool"), *extra],
        env={"MOCAP_RESOURCE_ADDR": broker.address}, log_path=tmp / "tracker.log", ready_timeout_s=120,
    ).start()


@pytest.fixture(scope="module")
def tracker(tmp_path_factory, broker):
    tmp = tmp_path_factory.mktemp("tracker")
    proc = _start_tracker(tmp, broker)
    proc.spool = tmp / "spool"
    yield proc
    proc.stop()


async def _requests(data: bytes, *, header: bool = True, pause_after: int | None = None,
                    pause_s: float = 0.0, max_persons: int = 0):
    if header:
        yield tracker_pb2.TrackRequest(header=tracker_pb2.TrackHeader(job="jobs/test", size_bytes=len(data),
                                                                      max_persons=max_persons))
    for i, start in enumerate(range(0, len(data), CHUNK)):
        if pause_after is not None and i == pause_after:
            await asyncio.sleep(pause_s)
        yield tracker_pb2.TrackRequest(chunk=data[start:start + CHUNK])


async def _lease_state(broker, name: str) -> int:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        lease = await resource_pb2_grpc.ResourceServiceStub(channel).GetLease(resource_pb2.GetLeaseRequest(name=name))
        return lease.state


async def _wait_lease_ended(broker, name: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await _lease_state(broker, name) != resource_pb2.LEASE_STATE_ACTIVE:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"lease {name} still ACTIVE after {timeout_s}s")


async def _active_tracker_leases(broker) -> list:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        reply = await stub.ListLeases(resource_pb2.ListLeasesRequest(state=resource_pb2.LEASE_STATE_ACTIVE))
        return [lease for lease in reply.leases if lease.holder.service == "tracker"]


async def test_runner_streams_one_track_under_a_lease_that_is_released(tracker, broker):
    data = RUNNER_MP4.read_bytes()
    frames: dict[int, list[int]] = {}
    result, progress = None, []
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        async for response in stub.Track(_requests(data), timeout=300):
            kind = response.WhichOneof("event")
            if kind == "poses":
                for piece in response.poses.tracks:
                    frames.setdefault(piece.track_id, []).extend(f.frame_index for f in piece.frames)
            elif kind == "progress":
                progress.append(response.progress.frames_done)
            else:
                result = response.result
    assert result is not None and result.video.frame_count == 180 and result.video.height == 1088
    assert result.track_count == 1 and list(frames) == [1]
    assert len(frames[1]) >= 175 and frames[1] == sorted(set(frames[1]))
    assert progress == sorted(progress) and progress[-1] <= 180
    assert result.lease.startswith("leases/") and result.fencing_token > 0
    assert result.lease_id == result.lease  # the deprecated field keeps its value for older clients
    assert await _lease_state(broker, result.lease) == resource_pb2.LEASE_STATE_RELEASED


async def test_street_avi_decoded_while_streaming_gives_several_tracks(tracker):
    data = shared_file(STREET_AVI).read_bytes()
    ids: set[int] = set()
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        async for response in stub.Track(_requests(data), timeout=300):
            if response.WhichOneof("event") == "poses":
                ids.update(piece.track_id for piece in response.poses.tracks)
            elif response.WhichOneof("event") == "result":
                assert response.result.track_count == len(ids)
    assert len(ids) >= 3 and min(ids) == 1


@pytest.mark.parametrize("case", ["not_a_video", "no_header", "bad_max_persons"])
async def test_bad_input_is_invalid_argument_and_leaves_no_lease_or_spool(tracker, broker, case):
    data = {"not_a_video": b"this is not a video at all " * 10_000}.get(case, RUNNER_MP4.read_bytes()[:CHUNK * 2])
    requests = _requests(data, header=case != "no_header", max_persons=99 if case == "bad_max_persons" else 0)
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Track(requests, timeout=60):
                pass
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    expected = {"not_a_video": "DECODE_FAILED", "no_header": "HEADER_REQUIRED", "bad_max_persons": "INVALID_FIELD"}
    assert details.reason == expected[case]
    assert await _active_tracker_leases(broker) == []
    assert not tracker.spool.exists() or list(tracker.spool.iterdir()) == []


@pytest.mark.parametrize(("width", "height"), [(16000, 16), (16, 16000)])
async def test_sliver_frames_are_refused_quickly(tracker, broker, tmp_path, width, height):
    """A 1 s 16000×16 clip once held the tracker for minutes at 0.4 fps and 6 GB RSS (1 001
    detector tiles per run), then invented a person; it is refused once its first frame is decoded."""
    data = write_h264_mp4(tmp_path / "sliver.mp4", width, height).read_bytes()
    started = time.monotonic()
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Track(_requests(data), timeout=60):
                pass
    elapsed = time.monotonic() - started
    details = describe_rpc_error(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_ASPECT_RATIO"), details
    assert f"{width}×{height}" in details.message and [v.field for v in details.violations] == ["chunk"]
    assert elapsed < 10, f"refused after {elapsed:.1f} s"
    assert await _active_tracker_leases(broker) == []
    assert not tracker.spool.exists() or list(tracker.spool.iterdir()) == []


async def test_cancel_mid_video_releases_the_lease_within_two_seconds(tracker, broker):
    data = RUNNER_MP4.read_bytes()
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        call = stub.Track(_requests(data), timeout=300)
        frames_done = 0
        async for response in call:
            if response.WhichOneof("event") == "progress":
                frames_done = response.progress.frames_done
                if frames_done >= 40:
                    break
        leases = await _active_tracker_leases(broker)
        assert len(leases) == 1
        call.cancel()
    # The lease is released only after the worker thread stopped decoding and inferring.
    assert await _wait_lease_ended(broker, leases[0].name, timeout_s=5.0) <= 2.5
    assert await _lease_state(broker, leases[0].name) == resource_pb2.LEASE_STATE_RELEASED
    assert not tracker.spool.exists() or list(tracker.spool.iterdir()) == []


async def test_lost_lease_aborts_the_call(tmp_path, broker):
    """The broker stops answering (frozen) past the lease's TTL: the tracker gives the lease up,
    stops its work and ends the call with ABORTED / LEASE_LOST."""
    tracker = _start_tracker(tmp_path, broker, "--lease-ttl-s", "2")
    data = shared_file(STREET_AVI).read_bytes()  # AVI decodes as bytes arrive, so progress comes before the pause
    try:
        async with grpc.aio.insecure_channel(tracker.address) as channel:
            stub = tracker_pb2_grpc.TrackerServiceStub(channel)
            # Hold the upload after a few chunks so the call is still running when the lease dies.
            call = stub.Track(_requests(data, pause_after=3, pause_s=30), timeout=120)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for response in call:
                    if response.WhichOneof("event") == "progress":
                        os.kill(broker.pid, signal.SIGSTOP)
                        try:
                            await asyncio.sleep(4.0)
                        finally:
                            os.kill(broker.pid, signal.SIGCONT)
        details = describe_rpc_error(caught.value)
        assert details.code == grpc.StatusCode.ABORTED and details.reason == "LEASE_LOST"
    finally:
        tracker.stop()


async def _track(tracker, data: bytes) -> tracker_pb2.TrackResult | None:
    result = None
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        async for response in stub.Track(_requests(data), timeout=300):
            if response.WhichOneof("event") == "result":
                result = response.result
    return result


async def test_damaged_frames_are_skipped_and_counted_in_the_result(tracker, broker, tmp_path):
    """4 kB of garbage mid-file: the call used to end INVALID_ARGUMENT with FFmpeg's
    "[Errno 1094995529] ... 'avcodec_send_packet()'" after the frames before it."""
    clean = damaged_media.runner_clip(tmp_path / "clip.mp4")
    result = await _track(tracker, damaged_media.overwrite_packet(clean, tmp_path / "damaged.mp4").read_bytes())
    assert result is not None and result.track_count == 1
    assert 1 <= result.undecodable_frames <= 5
    assert result.video.frame_count + result.undecodable_frames == damaged_media.FRAMES
    assert await _active_tracker_leases(broker) == []


async def test_a_heavily_damaged_video_is_video_damaged_without_decoder_internals(tracker, broker, tmp_path):
    clean = damaged_media.runner_clip(tmp_path / "clip.mp4")
    damaged_media.damage_packets(clean, tmp_path / "heavy.mp4", 0.4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _track(tracker, (tmp_path / "heavy.mp4").read_bytes())
    details = describe_rpc_error(caught.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "VIDEO_DAMAGED"), details
    assert "of the video's 60 frames could not be decoded" in details.message
    assert not damaged_media.INTERNALS.search(details.message), details.message
    assert [v.field for v in details.violations] == ["chunk"]
    assert await _active_tracker_leases(broker) == []
    assert not tracker.spool.exists() or list(tracker.spool.iterdir()) == []
