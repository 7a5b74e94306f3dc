"""The gRPC adapter of the tracker: decode the Track stream, run `TrackingService`, encode its
events, map domain errors to status codes (in `_service_error`, one place).

`main(argv)` is the service's entry point (`python -m tracker_svc [flags]`): health turns SERVING
once the BlazePose models are verified and loaded.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
import torch

from mocap.v1 import common_pb2, tracker_pb2, tracker_pb2_grpc
from mocap_common.channels import downstream_timeout
from mocap_common.config import load_config
from mocap_common.errors import (
    Aborted,
    Cancelled,
    FieldViolation,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from mocap_common.lease_client import LeaseLost
from mocap_common.logs import bind_context, configure_logging, get_logger
from mocap_common.posecodec import track_to_proto, video_to_proto
from mocap_common.server import ServiceHost, run_main
from mocap_common.streams import draining
from tracker_svc.config import TrackerServiceConfig
from tracker_svc.errors import ModelsMissingError, TrackerError, TrackingCancelled, VideoError
from tracker_svc.model_setup import model_paths
from tracker_svc.pipeline import Progress, TrackChunk, TrackerConfig
from tracker_svc.service import Done, TrackingService, TrackingSettings, TrackJob

log = get_logger(__name__)

MAX_PERSONS_LIMIT = 16


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
            header = await _read_header(requests)
            if header.job:
                bind_context(job=header.job)
            job = TrackJob(
                job=header.job,
                max_persons=self._max_persons(header.max_persons),
                frames_total=max(0, header.frame_count),
                acquire_timeout_s=downstream_timeout(context),
            )
            try:
                async for event in self.service.track(job, _video_bytes(requests)):
                    message = _encode(event)
                    if message is not None:
                        yield message
            except (TrackerError, LeaseLost) as error:
                raise _service_error(error) from error

    def _max_persons(self, value: int) -> int:
        if value == 0:
            return self.default_max_persons
        if not 1 <= value <= MAX_PERSONS_LIMIT:
            raise InvalidArgument(f"max_persons must be 1..{MAX_PERSONS_LIMIT} (0 = default)",
                                  violations=[FieldViolation("header.max_persons", f"{value} is not in 1..16")])
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
            lease_id=event.lease, fencing_token=event.fencing_token, frames_per_second=event.fps))
    return None  # LeaseHeld: logged, not sent


def _service_error(error: Exception) -> ServiceError:
    if isinstance(error, LeaseLost):
        return Aborted(f"the inference lease was lost; tracking stopped ({error})", reason="LEASE_LOST")
    if isinstance(error, VideoError):
        return InvalidArgument(f"the video could not be decoded: {error}", reason="DECODE_FAILED",
                               violations=[FieldViolation("chunk", str(error))])
    if isinstance(error, ModelsMissingError):
        return Unavailable(str(error), reason="MODEL_UNAVAILABLE", retry_after_s=60)
    if isinstance(error, TrackingCancelled):
        return Cancelled(str(error))
    return ServiceError(f"tracking failed: {error}", reason="INTERNAL")


def add_to(host: ServiceHost, servicer: TrackerServicer) -> None:
    host.add_servicer(tracker_pb2_grpc.add_TrackerServiceServicer_to_server, servicer, tracker_pb2, "TrackerService")


async def serve(argv: list[str]) -> None:
    config = load_config(TrackerServiceConfig, argv)
    configure_logging("tracker", config.log_level, config.log_format)
    torch.set_num_threads(max(1, config.torch_threads))
    settings = TrackingSettings(
        resource_addr=config.resource_addr, device=config.device, lease_ttl_s=config.lease_ttl_s,
        acquire_timeout_s=config.acquire_timeout_s, max_concurrent_calls=config.max_concurrent_calls,
        spool_dir=config.spool_dir, pipeline=TrackerConfig(batch_size=config.batch_size),
    )
    try:
        models = model_paths(config.model_dir)
    except ModelsMissingError as error:
        raise SystemExit(f"tracker: {error}") from None
    service = TrackingService(settings, models)
    host = ServiceHost(config)
    add_to(host, TrackerServicer(service, config.default_max_persons))
    host.on_shutdown(service.close, "track-calls")
    await host.start()  # health says NOT_SERVING while the models load
    await asyncio.to_thread(service.load, "cpu")
    log.info("models loaded", detector=str(models.detector), landmark=str(models.landmark))
    await host.set_serving()
    await host.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    run_main(lambda: serve(sys.argv[1:] if argv is None else argv))
    return 0
