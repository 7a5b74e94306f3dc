"""Every client-streaming RPC answers a refused stream with its own status, every time.

grpc/grpc#36066: a grpc.aio client that is still writing when the server ends the call can report
INTERNAL "Internal error from Core" instead of the status the server sent. The services drain a
refused request stream before they answer (`mocap_common.streams.draining`); these tests make
the race likely — a client that keeps streaming chunks after the bad message, many times over —
and require the documented code and ErrorInfo reason on every single answer. Real services as
child processes, real aio clients; one server per service for the whole module.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from mocap.v1 import (
    common_pb2,
    exporter_pb2,
    exporter_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    resource_pb2,
    resource_pb2_grpc,
    smoother_pb2,
    smoother_pb2_grpc,
    tracker_pb2,
    tracker_pb2_grpc,
)
from mocap_common.errors import ERROR_DOMAIN, InvalidArgument
from mocap_common.posecodec import chunk_tracks, video_to_proto
from mocap_common.poses import VideoInfo
from mocap_common.rpc_errors import describe_rpc_error
from mocap_common.streams import DrainLimits, RequestStream, draining
from tests.gateway.fakes import fake_tracks
from tests.support import ServiceProcess, free_port

REPEATS = 50  # per case: the race hit about one call in six before the fix
AT_ONCE = 5  # calls in flight together (more load on the server makes the race likelier)
EXTRA_CHUNKS = 8  # what the client still streams after the bad message
# After a bad chunk that the server reaches only once it has set up (upload row and file, lease):
# enough that the client is still writing then (beyond HTTP/2 flow-control windows).
LONG_TAIL = 48
CHUNK_BYTES = 64 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GATEWAY_MAX_UPLOAD = 8 * 1024 * 1024
VIDEO = VideoInfo(width=640, height=480, fps=30.0, frame_count=40, duration_s=40 / 30.0)

Messages = Callable[[], Iterator[object]]
Outcome = tuple[grpc.StatusCode, str]


async def _stream(messages: Messages) -> AsyncIterator[object]:
    for message in messages():
        yield message


async def _answers(start_call: Callable[[AsyncIterator[object]], object], messages: Messages) -> collections.Counter[Outcome]:
    """(code, reason) of REPEATS calls that must all fail; INTERNAL shows up here if the race is lost."""
    async def one() -> Outcome:
        try:
            call = start_call(_stream(messages))
            if hasattr(call, "__aiter__"):
                async for _ in call:  # type: ignore[attr-defined]
                    pass
            else:
                await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as error:
            details = describe_rpc_error(error)
            assert not details.reason or details.domain == ERROR_DOMAIN, details
            return details.code, details.reason
        return grpc.StatusCode.OK, ""

    seen: collections.Counter[Outcome] = collections.Counter()
    for _ in range(REPEATS // AT_ONCE):
        seen.update(await asyncio.gather(*(one() for _ in range(AT_ONCE))))
    return seen


def _named(seen: collections.Counter[Outcome]) -> dict[str, int]:
    return {f"{code.name} {reason or '(no reason)'}": count for (code, reason), count in seen.items()}


def _filler(size: int = CHUNK_BYTES) -> bytes:
    return os.urandom(size)


# --- services (one each per module) --------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stream-rejections")


@pytest.fixture(scope="module")
def broker(workdir) -> Iterator[ServiceProcess]:
    with ServiceProcess("resource_svc", ["--db-path", str(workdir / "leases.sqlite3")],
                        log_path=workdir / "resource.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def tracker(workdir, broker) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("tracker_svc", ["--spool-dir", str(workdir / "spool")], env={"MOCAP_RESOURCE_ADDR": broker.address},
                          log_path=workdir / "tracker.log", ready_timeout_s=120)
    with proc:
        yield proc


@pytest.fixture(scope="module")
def smoother(workdir) -> Iterator[ServiceProcess]:
    args = ["--checkpoint-dir", str(workdir / "checkpoints"), "--resource-addr", f"127.0.0.1:{free_port()}"]
    with ServiceProcess("smoother_svc", args, log_path=workdir / "smoother.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def exporter(workdir) -> Iterator[ServiceProcess]:
    with ServiceProcess("exporter_svc", ["--work-dir", str(workdir / "export-work")], log_path=workdir / "exporter.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(workdir) -> Iterator[ServiceProcess]:
    # Room for AT_ONCE uploads of one tenant streaming together.
    args = ["--data-dir", str(workdir / "gateway-data"), "--min-free-bytes", "0",
            "--max-upload-bytes", str(GATEWAY_MAX_UPLOAD), "--max-active-jobs-per-tenant", str(4 * AT_ONCE)]
    with ServiceProcess("gateway", args, log_path=workdir / "gateway.log") as proc:
        yield proc


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# --- CreateJob -----------------------------------------------------------------------------

UPLOAD_SIZE = (EXTRA_CHUNKS + 1) * CHUNK_BYTES


def _upload_header(**fields: object) -> gateway_pb2.CreateJobRequest:
    values: dict[str, object] = {"filename": "clip.mp4", "size_bytes": UPLOAD_SIZE, **fields}
    return gateway_pb2.CreateJobRequest(header=gateway_pb2.UploadHeader(**values))  # type: ignore[arg-type]


def _upload_chunks(first: int = 0, count: int = EXTRA_CHUNKS) -> Iterator[gateway_pb2.CreateJobRequest]:
    for i in range(first, first + count):
        yield gateway_pb2.CreateJobRequest(chunk=gateway_pb2.UploadChunk(offset=i * CHUNK_BYTES, data=_filler()))


def _upload_then(head: gateway_pb2.CreateJobRequest, first_chunk: int = 0) -> Messages:
    return lambda: iter([head, *_upload_chunks(first_chunk)])


CREATE_JOB_CASES: dict[str, tuple[Messages, grpc.StatusCode, str]] = {
    "no header": (lambda: _upload_chunks(), INVALID, "HEADER_REQUIRED"),
    "too many persons": (_upload_then(_upload_header(options=common_pb2.JobOptions(max_persons=17))), INVALID, "INVALID_FIELD"),
    "over the size limit": (_upload_then(_upload_header(size_bytes=GATEWAY_MAX_UPLOAD + 1)), INVALID, "UPLOAD_TOO_LARGE"),
    "second header": (lambda: iter([_upload_header(), *_upload_chunks(0, 1), _upload_header(), *_upload_chunks(1, LONG_TAIL)]),
                      INVALID, "HEADER_REQUIRED"),
}


@pytest.mark.parametrize("case", list(CREATE_JOB_CASES))
async def test_create_job_refusals_never_turn_internal(case, gateway, workdir):
    messages, code, reason = CREATE_JOB_CASES[case]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        seen = await _answers(lambda requests: stub.CreateJob(requests, timeout=60), messages)
    assert seen == {(code, reason): REPEATS}, _named(seen)
    assert _entries(workdir / "gateway-data" / "jobs") == []  # no partial upload left


# --- Track ---------------------------------------------------------------------------------


def _track_header(**fields: object) -> tracker_pb2.TrackRequest:
    return tracker_pb2.TrackRequest(header=tracker_pb2.TrackHeader(job="jobs/race", **fields))  # type: ignore[arg-type]


def _video_chunks(count: int = EXTRA_CHUNKS) -> list[tracker_pb2.TrackRequest]:
    return [tracker_pb2.TrackRequest(chunk=_filler()) for _ in range(count)]


TRACK_CASES: dict[str, tuple[Messages, grpc.StatusCode, str]] = {
    "no header": (lambda: iter(_video_chunks()), INVALID, "HEADER_REQUIRED"),
    "empty first message": (lambda: iter([tracker_pb2.TrackRequest(), *_video_chunks()]), INVALID, "HEADER_REQUIRED"),
    "bad max_persons": (lambda: iter([_track_header(max_persons=99), *_video_chunks()]), INVALID, "INVALID_FIELD"),
    "second header": (lambda: iter([_track_header(), *_video_chunks(1), _track_header(), *_video_chunks(LONG_TAIL)]),
                      INVALID, "HEADER_REQUIRED"),
}


async def _active_tracker_leases(broker: ServiceProcess) -> list[resource_pb2.Lease]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        reply = await stub.ListLeases(resource_pb2.ListLeasesRequest(state=resource_pb2.LEASE_STATE_ACTIVE))
        return [lease for lease in reply.leases if lease.holder.service == "tracker"]


@pytest.mark.parametrize("case", list(TRACK_CASES))
async def test_track_refusals_never_turn_internal(case, tracker, broker, workdir):
    messages, code, reason = TRACK_CASES[case]
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        stub = tracker_pb2_grpc.TrackerServiceStub(channel)
        seen = await _answers(lambda requests: stub.Track(requests, timeout=60), messages)
    assert seen == {(code, reason): REPEATS}, _named(seen)
    assert await _active_tracker_leases(broker) == []
    assert _entries(workdir / "spool") == []


# --- SmoothStream --------------------------------------------------------------------------


def _pose_chunks(count: int = EXTRA_CHUNKS) -> list[common_pb2.PoseChunk]:
    return list(chunk_tracks(fake_tracks(VIDEO.frame_count), 5))[:count]


def _smooth_header(**options: object) -> smoother_pb2.SmoothStreamRequest:
    return smoother_pb2.SmoothStreamRequest(header=smoother_pb2.SmoothStreamHeader(
        job="jobs/race", video=video_to_proto(VIDEO), options=smoother_pb2.SmoothOptions(**options)))  # type: ignore[arg-type]


def _smooth_poses(count: int = EXTRA_CHUNKS) -> list[smoother_pb2.SmoothStreamRequest]:
    return [smoother_pb2.SmoothStreamRequest(poses=chunk) for chunk in _pose_chunks(count)]


SMOOTH_CASES: dict[str, tuple[Messages, grpc.StatusCode, str]] = {
    "no header": (lambda: iter(_smooth_poses()), INVALID, "HEADER_REQUIRED"),
    "empty first message": (lambda: iter([smoother_pb2.SmoothStreamRequest(), *_smooth_poses()]), INVALID, "HEADER_REQUIRED"),
    "second header": (lambda: iter([_smooth_header(), *_smooth_poses(1), _smooth_header(), *_smooth_poses()]),
                      INVALID, "HEADER_REQUIRED"),
    "max gap out of range": (lambda: iter([_smooth_header(max_gap_seconds=1e9), *_smooth_poses()]), INVALID, "INVALID_FIELD"),
}


@pytest.mark.parametrize("case", list(SMOOTH_CASES))
async def test_smooth_stream_refusals_never_turn_internal(case, smoother):
    messages, code, reason = SMOOTH_CASES[case]
    async with grpc.aio.insecure_channel(smoother.address) as channel:
        stub = smoother_pb2_grpc.SmootherServiceStub(channel)
        seen = await _answers(lambda requests: stub.SmoothStream(requests, timeout=60), messages)
    assert seen == {(code, reason): REPEATS}, _named(seen)


# --- Export --------------------------------------------------------------------------------


def _export_header(**fields: object) -> exporter_pb2.ExportRequest:
    return exporter_pb2.ExportRequest(header=exporter_pb2.ExportHeader(video=video_to_proto(VIDEO), **fields))  # type: ignore[arg-type]


def _export_poses(count: int = EXTRA_CHUNKS) -> list[exporter_pb2.ExportRequest]:
    return [exporter_pb2.ExportRequest(poses=chunk) for chunk in _pose_chunks(count)]


def _export_video(count: int = EXTRA_CHUNKS) -> list[exporter_pb2.ExportRequest]:
    return [exporter_pb2.ExportRequest(video_chunk=_filler()) for _ in range(count)]


EXPORT_CASES: dict[str, tuple[Messages, grpc.StatusCode, str]] = {
    "no header": (lambda: iter(_export_poses()), INVALID, "HEADER_REQUIRED"),
    "bad name_stem": (lambda: iter([_export_header(name_stem="../etc"), *_export_poses()]), INVALID, "INVALID_FIELD"),
    "preview too large": (lambda: iter([_export_header(preview=True, video_size_bytes=1 << 40), *_export_poses(2), *_export_video()]),
                          INVALID, "UPLOAD_TOO_LARGE"),
    "second header": (lambda: iter([_export_header(), *_export_poses(1), _export_header(), *_export_poses()]),
                      INVALID, "HEADER_REQUIRED"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
async def test_export_refusals_never_turn_internal(case, exporter, workdir):
    messages, code, reason = EXPORT_CASES[case]
    async with grpc.aio.insecure_channel(exporter.address) as channel:
        stub = exporter_pb2_grpc.ExporterServiceStub(channel)
        seen = await _answers(lambda requests: stub.Export(requests, timeout=60), messages)
    assert seen == {(code, reason): REPEATS}, _named(seen)
    assert _entries(workdir / "export-work") == []  # every call's directory removed


# --- the drain's bounds (no server: a hostile client is an endless or trickling stream) ---------

SMALL = DrainLimits(seconds=0.5, idle_seconds=0.2, max_bytes=256 * 1024)


async def _chunks(pause_s: float = 0.0, count: int | None = None, then_hang: bool = False) -> AsyncIterator[tracker_pb2.TrackRequest]:
    sent = 0
    while count is None or sent < count:
        await asyncio.sleep(pause_s)
        sent += 1
        yield tracker_pb2.TrackRequest(chunk=b"x" * 4096)
    if then_hang:
        await asyncio.Event().wait()


async def _timed_drain(stream: RequestStream) -> tuple[str, float]:
    started = asyncio.get_running_loop().time()
    limit = await asyncio.wait_for(stream.drain(SMALL), 5)
    return limit, asyncio.get_running_loop().time() - started


async def test_drain_of_an_endless_stream_stops_at_the_byte_limit():
    limit, took = await _timed_drain(RequestStream(_chunks()))
    assert limit == "max_bytes" and took < SMALL.seconds


async def test_drain_of_a_trickle_stops_at_the_time_limit():
    limit, took = await _timed_drain(RequestStream(_chunks(pause_s=0.05)))
    assert limit == "seconds" and SMALL.seconds <= took < SMALL.seconds + 1.0


async def test_drain_of_a_quiet_client_ends_after_the_idle_time():
    stream = RequestStream(_chunks(count=3, then_hang=True))
    limit, took = await _timed_drain(stream)
    assert limit == "" and took < SMALL.seconds


async def test_a_read_cancelled_while_waiting_loses_no_message():
    queue: asyncio.Queue[tracker_pb2.TrackRequest] = asyncio.Queue()

    async def client() -> AsyncIterator[tracker_pb2.TrackRequest]:
        while True:
            yield await queue.get()

    stream = RequestStream(client())
    reader = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    reader.cancel()  # like the tracker's feeder task when its pipeline fails
    await asyncio.gather(reader, return_exceptions=True)
    queue.put_nowait(tracker_pb2.TrackRequest(chunk=b"first"))
    assert (await asyncio.wait_for(anext(stream), 1)).chunk == b"first"
    stream.close()


async def test_draining_reads_the_rest_after_a_refusal_but_not_after_a_cancel():
    for error, drained in ((InvalidArgument("bad header"), True), (asyncio.CancelledError(), False)):
        consumed: list[int] = []

        async def client() -> AsyncIterator[tracker_pb2.TrackRequest]:
            for i in range(5):
                consumed.append(i)
                yield tracker_pb2.TrackRequest(chunk=b"x")

        with pytest.raises(type(error)):
            async with draining(client(), SMALL) as requests:
                await anext(requests)
                raise error
        assert len(consumed) == (5 if drained else 1)
