"""The stage services over gRPC: the `Stages` (gateway.stage_api) the pipeline drives.

Track streams the input video in 1 MiB chunks and assembles the returned pose chunks; Smooth is
one unary call when the tracks are small enough, else a stream; Export streams the tracks (and
the video for the preview) and hands each returned file to the pipeline's sink. A call runs
under the deadline it is given and is cancelled with the task that awaits it; gRPC failures
become `StageCallError`s. Only a stage's own error message (one with the mesh's ErrorInfo) is
passed on as the error's message; an error gRPC made up itself (connection refused, reset, a
message over its size limit) carries peer addresses and transport text, which go to the log
(`StageCallError.detail`), never to the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from gateway.config import GatewayConfig
from gateway.jobs import JobRecord
from gateway.artifacts import name_stem
from gateway.stage_api import (
    ExportOutput,
    FileSink,
    ProgressCallback,
    SmoothOutput,
    StageCallError,
    TrackOutput,
)
from mocap.v1 import exporter_pb2, exporter_pb2_grpc, smoother_pb2, smoother_pb2_grpc, tracker_pb2, tracker_pb2_grpc
from mocap_common.channels import open_channel
from mocap_common.errors import ERROR_DOMAIN, ServiceError
from mocap_common.posecodec import (
    PoseTrackAssembler,
    chunk_tracks,
    track_set_from_proto,
    track_set_to_proto,
    video_from_proto,
    video_to_proto,
)
from mocap_common.poses import PoseTrackSet
from mocap_common.rpc_errors import describe_rpc_error

CHUNK_BYTES = 1024 * 1024


class GrpcStages:
    """TrackerService, SmootherService and ExporterService clients."""

    def __init__(self, config: GatewayConfig) -> None:
        self._channels = [open_channel(a) for a in (config.tracker_addr, config.smoother_addr, config.exporter_addr)]
        self._tracker = tracker_pb2_grpc.TrackerServiceStub(self._channels[0])
        self._smoother = smoother_pb2_grpc.SmootherServiceStub(self._channels[1])
        self._exporter = exporter_pb2_grpc.ExporterServiceStub(self._channels[2])
        self._smooth_unary_max_bytes = config.smooth_unary_max_bytes

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    # Track -------------------------------------------------------------------------------------

    async def track(self, job: JobRecord, video: Path, timeout_s: float, progress: ProgressCallback) -> TrackOutput:
        header = tracker_pb2.TrackHeader(
            job=job.name, size_bytes=job.size_bytes, container_hint=job.input_name.rsplit(".", 1)[-1],
            max_persons=job.options.max_persons, frame_count=job.video.frame_count,
        )

        async def requests() -> AsyncIterator[tracker_pb2.TrackRequest]:
            yield tracker_pb2.TrackRequest(header=header)
            async for chunk in _file_chunks(video):
                yield tracker_pb2.TrackRequest(chunk=chunk)

        assembler = PoseTrackAssembler()
        result: tracker_pb2.TrackResult | None = None
        async with _Call(self._tracker.Track(requests(), timeout=timeout_s)) as call:
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "progress":
                    p = response.progress
                    await progress(p.frames_done / p.frames_total if p.frames_total else 0.0, p.frames_done, p.frames_total)
                elif kind == "poses":
                    _checked(assembler.add_chunk, response.poses, what="the tracker's poses")
                elif kind == "result":
                    result = response.result
        if result is None:
            raise StageCallError("failed", "the tracker ended its stream without a result", responded=True)
        video_info = video_from_proto(result.video if result.HasField("video") else job.video)
        return TrackOutput(PoseTrackSet(video=video_info, tracks=assembler.tracks()),
                           undecodable_frames=max(0, result.undecodable_frames))

    # Smooth ------------------------------------------------------------------------------------

    async def smooth(self, job: JobRecord, tracks: PoseTrackSet, timeout_s: float, progress: ProgressCallback) -> SmoothOutput:
        options = smoother_pb2.SmoothOptions(preset=job.options.smoothing)
        message = await asyncio.to_thread(track_set_to_proto, tracks)
        if message.ByteSize() <= self._smooth_unary_max_bytes:
            async with _Call(self._smoother.Smooth(smoother_pb2.SmoothRequest(job=job.name, options=options, tracks=message),
                                                   timeout=timeout_s)) as call:
                response = await call.response()
            smoothed = _checked(track_set_from_proto, response.tracks, what="the smoother's tracks")
            return SmoothOutput(smoothed, list(response.metrics), response.method)
        return await self._smooth_stream(job, tracks, options, timeout_s)

    async def _smooth_stream(self, job: JobRecord, tracks: PoseTrackSet, options: smoother_pb2.SmoothOptions,
                             timeout_s: float) -> SmoothOutput:
        async def requests() -> AsyncIterator[smoother_pb2.SmoothStreamRequest]:
            yield smoother_pb2.SmoothStreamRequest(header=smoother_pb2.SmoothStreamHeader(
                job=job.name, options=options, video=video_to_proto(tracks.video)))
            for chunk in chunk_tracks(tracks.tracks):
                yield smoother_pb2.SmoothStreamRequest(poses=chunk)

        assembler = PoseTrackAssembler()
        summary: smoother_pb2.SmoothSummary | None = None
        async with _Call(self._smoother.SmoothStream(requests(), timeout=timeout_s)) as call:
            async for response in call:
                if response.WhichOneof("event") == "poses":
                    _checked(assembler.add_chunk, response.poses, what="the smoother's poses")
                elif response.WhichOneof("event") == "summary":
                    summary = response.summary
        if summary is None:
            raise StageCallError("failed", "the smoother ended its stream without a summary", responded=True)
        return SmoothOutput(PoseTrackSet(video=tracks.video, tracks=assembler.tracks()), list(summary.metrics), summary.method)

    # Export ------------------------------------------------------------------------------------

    async def export(self, job: JobRecord, tracks: PoseTrackSet, video: Path | None, sink: FileSink,
                     timeout_s: float, progress: ProgressCallback) -> ExportOutput:
        header = exporter_pb2.ExportHeader(
            job=job.name, formats=job.options.formats, preview=video is not None,
            root_motion=job.options.root_motion, disable_foot_locking=job.options.disable_foot_locking,
            video=job.video, video_size_bytes=job.size_bytes if video is not None else 0,
            name_stem=name_stem(job.display_filename),
        )

        async def requests() -> AsyncIterator[exporter_pb2.ExportRequest]:
            yield exporter_pb2.ExportRequest(header=header)
            for chunk in chunk_tracks(tracks.tracks):
                yield exporter_pb2.ExportRequest(poses=chunk)
            if video is not None:
                async for data in _file_chunks(video):
                    yield exporter_pb2.ExportRequest(video_chunk=data)

        result: exporter_pb2.ExportResult | None = None
        async with _Call(self._exporter.Export(requests(), timeout=timeout_s)) as call:
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "progress":
                    await progress(response.progress.fraction, 0, 0)
                elif kind == "file":
                    await sink.begin(response.file)
                elif kind == "chunk":
                    await sink.write(response.chunk.offset, response.chunk.data)
                elif kind == "result":
                    await sink.end()
                    result = response.result
        if result is None:
            raise StageCallError("failed", "the exporter ended its stream without a result", responded=True)
        return ExportOutput(list(result.quality))


class _Call:
    """Owns one stage call: cancels it on any exit (so a cancelled job stops the stage), and turns
    gRPC errors into StageCallErrors that say whether the stage had answered anything."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._responded = False
        self._iter: Any = None

    async def __aenter__(self) -> "_Call":
        return self

    def __aiter__(self) -> "_Call":
        self._iter = self._call.__aiter__()
        return self

    async def __anext__(self) -> Any:
        message = await self._iter.__anext__()
        self._responded = True
        return message

    async def response(self) -> Any:
        """The response of a unary call."""
        response = await self._call
        self._responded = True
        return response

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._call.cancel()  # no-op when the call already ended
        if isinstance(exc, grpc.aio.AioRpcError):
            raise _call_error(exc, self._responded) from None


def _call_error(error: grpc.aio.AioRpcError, responded: bool) -> StageCallError:
    details = describe_rpc_error(error)
    code = details.code
    if code == grpc.StatusCode.UNAVAILABLE:
        kind = "unavailable"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = "timeout"
    else:
        kind = "failed"
    raw = details.message or code.name
    if details.domain == ERROR_DOMAIN:  # the stage's own words (it sanitises them; the pipeline does again)
        message, reason = raw, details.reason
    else:  # made up by gRPC (or something between us and the stage): transport text, addresses
        message, reason = f"the call ended with {code.name} before the service gave a reason", ""
    return StageCallError(kind, message, responded=responded, reason=reason, detail=raw)


def _checked(fn: Any, *args: Any, what: str) -> Any:
    """Runs a decoder on a stage's output; malformed output fails the stage."""
    try:
        return fn(*args)
    except ServiceError as exc:
        raise StageCallError("failed", f"{what} were malformed: {exc.message}", responded=True, reason=exc.reason) from None


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while data := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield data
    finally:
        handle.close()
