"""The gRPC adapter of the tracker: decode the Track stream, run `TrackingService`, encode its
events, map domain errors to status codes (`TRACKER_ERRORS`, one table, applied by `mapped_errors`).

The service is assembled and served by `python -m tracker_svc` (tracker_svc/__main__.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mocap.v1 import common_pb2, tracker_pb2, tracker_pb2_grpc
from mocap_common.channels import downstream_timeout
from mocap_common.errors import (
    Aborted,
    As,
    Cancelled,
    ErrorTable,
    FieldViolation,
    InvalidArgument,
    Unavailable,
)
from mocap_common.lease_client import LeaseLost
from mocap_common.limits import MAX_PERSONS_LIMIT
from mocap_common.logs import bind_context, get_logger
from mocap_common.posecodec import track_to_proto, video_to_proto
from mocap_common.rpc_errors import mapped_errors
from mocap_common.server import ServiceHost
from mocap_common.streams import draining
from tracker_svc.errors import ModelsMissingError, TrackingCancelled, VideoError
from tracker_svc.pipeline import Progress, TrackChunk
from tracker_svc.service import Done, TrackingService, TrackJob
from tracker_svc.video import VideoDamagedError

log = get_logger(__name__)


# The status a client sees for each named domain error (most specific class first). Any other
# TrackerError (a model that fails to set up, an unsupported graph) is INTERNAL with a fixed
# message; its text goes to the log only. LEASE_LOST is ABORTED, as from the broker.
TRACKER_ERRORS: ErrorTable = {
    LeaseLost: As(Aborted, "LEASE_LOST", "the inference lease was lost; tracking stopped ({error})"),
    VideoDamagedError: As(InvalidArgument, "VIDEO_DAMAGED", details=lambda error: {"violations": [FieldViolation(
        "chunk", f"at most {error.limit * 100:g} % of the frames may be undecodable")]}),
    # VideoError messages are plain sentences (FFmpeg's own text stays in the tracker's log).
    VideoError: As(InvalidArgument, "DECODE_FAILED", "the video could not be decoded: {error}",
                   details=lambda error: {"violations": [FieldViolation("chunk", str(error))]}),
    ModelsMissingError: As(Unavailable, "MODEL_UNAVAILABLE", retry_after_s=60),
    TrackingCancelled: As(Cancelled),
}


class TrackerServicer(tracker_pb2_grpc.TrackerServiceServicer):
    def __init__(self, service: TrackingService, default_max_persons: int) -> None:
        self.service = service
        self.default_max_persons = default_max_persons

    async def Track(self, request_iterator: AsyncIterator[tracker_pb2.TrackRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[tracker_pb2.TrackResponse]:
        # Drained when the call ends early (a refused header or chunk, an undecodable video, a
        # lost lease) after the lease is released and the spool removed: the client gets our
        # status, not INTERNAL. Its reads also survive the feeder task being cancelled.
        async with draining(request_iterator) as requests:
            with mapped_errors(TRACKER_ERRORS):
                header = await _read_header(requests)
                if header.job:
                    bind_context(job=header.job)
                job = TrackJob(
                    job=header.job,
                    max_persons=self._max_persons(header.max_persons),
                    frames_total=max(0, header.frame_count),
                    acquire_timeout_s=downstream_timeout(context),
                )
                async for event in self.service.track(job, _video_bytes(requests)):
                    message = _encode(event)
                    if message is not None:
                        yield message

    def _max_persons(self, value: int) -> int:
        if value == 0:
            return self.default_max_persons
        if not 1 <= value <= MAX_PERSONS_LIMIT:
            raise InvalidArgument(f"max_persons must be 1..{MAX_PERSONS_LIMIT} (0 = default)",
                                  violations=[FieldViolation("header.max_persons", f"{value} is not in 1..{MAX_PERSONS_LIMIT}")])
        return value


async def _read_header(requests: AsyncIterator[tracker_pb2.TrackRequest]) -> tracker_pb2.TrackHeader:
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        raise InvalidArgument("the stream ended before its header", reason="EMPTY_UPLOAD") from None
    if first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message must be a header", reason="HEADER_REQUIRED",
                              violations=[FieldViolation("header", "missing from the first message")])
    return first.header


async def _video_bytes(requests: AsyncIterator[tracker_pb2.TrackRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgument("only the first message may be a header", reason="HEADER_REQUIRED",
                                  violations=[FieldViolation("header", "sent again after the first message")])
        yield request.chunk


def _encode(event: object) -> tracker_pb2.TrackResponse | None:
    if isinstance(event, TrackChunk):
        return tracker_pb2.TrackResponse(poses=common_pb2.PoseChunk(tracks=[track_to_proto(event.track)]))
    if isinstance(event, Progress):
        return tracker_pb2.TrackResponse(progress=tracker_pb2.TrackProgress(
            frames_done=event.frames_done, frames_total=event.frames_total, frames_per_second=event.fps))
    if isinstance(event, Done):
        return tracker_pb2.TrackResponse(result=tracker_pb2.TrackResult(
            video=video_to_proto(event.video), track_count=event.track_count, device=event.device,
            lease=event.lease, lease_id=event.lease,  # lease_id: deprecated, the same value
            fencing_token=event.fencing_token, frames_per_second=event.fps,
            undecodable_frames=event.undecodable_frames))
    return None  # LeaseHeld: logged, not sent


def add_to(host: ServiceHost, servicer: TrackerServicer) -> None:
    host.add_servicer(tracker_pb2_grpc.add_TrackerServiceServicer_to_server, servicer, tracker_pb2, "TrackerService")

