"""gRPC adapter for ExporterService: decode the request stream, run the export, stream back
progress, files (announcement + ≤ 1 MiB chunks, sha256 over the bytes sent) and the result.

Everything the call writes lives in its own directory (`workspace.call_workspace`), removed when
the call ends however it ends. Errors: the export's domain raises ServiceError subclasses
(`Unsolvable`, `BlenderTimeout`, `BlenderFailed`, `Cancelled`, intake's `InvalidArgument`), which
pass `mapped_errors` unchanged; anything else ends the call INTERNAL with a fixed message
(`EXPORTER_ERRORS` is the table for named errors that are not ServiceErrors: none today). The
request stream is drained before the call ends (`mocap_common.streams.draining`, after the
directory is gone), so a refused client gets its INVALID_ARGUMENT rather than INTERNAL.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import grpc
from prometheus_client import Counter

from exporter_svc.config import ExporterConfig
from exporter_svc.export import ExportOutcome, Exporter, ProducedFile
from exporter_svc.intake import IntakeLimits, read_export_request
from exporter_svc.workspace import call_workspace
from mocap.v1 import common_pb2, exporter_pb2, exporter_pb2_grpc
from mocap_common.background import EventRuns
from mocap_common.errors import ErrorTable, Internal, Unavailable
from mocap_common.files import sha256_and_size
from mocap_common.logs import bound_context, get_logger
from mocap_common.rpc_errors import mapped_errors
from mocap_common.streams import draining

log = get_logger(__name__)

FILES_SENT = Counter("mocap_exporter_files_sent_total", "Files streamed back to callers, by kind.", ["kind"])

CHUNK_BYTES = 1024 * 1024
# Named domain errors that are not ServiceErrors already, and their statuses (see the module doc).
EXPORTER_ERRORS: ErrorTable = {}

KINDS = {"bvh": common_pb2.ARTIFACT_KIND_BVH, "fbx": common_pb2.ARTIFACT_KIND_FBX,
         "glb": common_pb2.ARTIFACT_KIND_GLB, "preview": common_pb2.ARTIFACT_KIND_PREVIEW}


class ExporterServicer(exporter_pb2_grpc.ExporterServiceServicer):
    def __init__(self, exporter: Exporter, config: ExporterConfig) -> None:
        self._exporter = exporter
        self._config = config
        self._limits = IntakeLimits(max_video_bytes=config.max_video_bytes, max_pose_frames=config.max_pose_frames,
                                    max_tracks=config.max_tracks)
        self._runs: EventRuns[tuple[str, float] | ExportOutcome] = EventRuns(
            lambda: Unavailable("the export was stopped: the exporter is shutting down"))

    async def Export(self, request_iterator: AsyncIterator[exporter_pb2.ExportRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[exporter_pb2.ExportResponse]:
        # The workspace closes first: a drained refusal leaves no directory behind while it drains.
        async with (draining(request_iterator) as requests, call_workspace(self._config.work_dir) as workdir,
                    mapped_errors(EXPORTER_ERRORS)):
            job, options = await read_export_request(requests, workdir, self._limits)
            with bound_context(job=job.job, tracks=len(job.tracks)):
                log.info("export started", formats=list(options.formats), preview=options.preview,
                         in_place=options.in_place, foot_locking=options.foot_locking)

                async def produce(emit: Callable[[tuple[str, float] | ExportOutcome], None]) -> None:
                    emit(await self._exporter.export(job, options, workdir, progress=lambda step, f: emit((step, f)),
                                                     time_left_s=context.time_remaining))

                # The export runs in a task of its own; leaving this loop early (the caller went
                # away, a send failed) cancels it and waits until it has stopped.
                outcome: ExportOutcome | None = None
                async for event in self._runs.stream(produce, f"export {job.job}"):
                    if isinstance(event, ExportOutcome):
                        outcome = event
                    else:
                        step, fraction = event
                        yield exporter_pb2.ExportResponse(progress=exporter_pb2.ExportProgress(step=step, fraction=fraction))
                assert outcome is not None  # the stream ends only after the export returned
                for produced in outcome.files:
                    async for message in _file_messages(produced):
                        yield message
                yield exporter_pb2.ExportResponse(progress=exporter_pb2.ExportProgress(step="done", fraction=1.0))
                yield exporter_pb2.ExportResponse(result=_result(outcome))
                log.info("export finished", files=len(outcome.files),
                         blender_startup_s=round(outcome.blender_startup_seconds, 3),
                         **{k: round(v, 3) for k, v in outcome.timings.items()})


async def _file_messages(produced: ProducedFile) -> AsyncIterator[exporter_pb2.ExportResponse]:
    """The announcement, then the chunks; the announced sha256 is checked against what was sent."""
    announced, size = sha256_and_size(produced.path, CHUNK_BYTES)
    yield exporter_pb2.ExportResponse(file=exporter_pb2.ExportedFile(
        filename=produced.filename, kind=KINDS[produced.kind], track_id=produced.track_id,
        size_bytes=size, sha256=announced, media_type=produced.media_type))
    sent_hash, offset = hashlib.sha256(), 0
    with open(produced.path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            sent_hash.update(chunk)
            yield exporter_pb2.ExportResponse(chunk=exporter_pb2.FileChunk(offset=offset, data=chunk))
            offset += len(chunk)
    if offset != size or sent_hash.hexdigest() != announced:
        raise Internal(f"{produced.filename} changed while it was being sent")
    FILES_SENT.labels(produced.kind).inc()


def _result(outcome: ExportOutcome) -> exporter_pb2.ExportResult:
    return exporter_pb2.ExportResult(
        quality=sorted(outcome.quality, key=lambda q: q.track_id),
        blender_seconds=outcome.blender_seconds,
        blender_startup_seconds=outcome.blender_startup_seconds,
        solve=sorted(outcome.solve, key=lambda q: q.track_id),
        animation_fps=outcome.fps,
    )
