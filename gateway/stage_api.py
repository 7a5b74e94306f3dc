"""What the pipeline asks of the stage services: the `Stages` interface, what each stage returns,
the sink the exporter's files go to, and how a stage call fails.

`gateway.stages` implements `Stages` over gRPC and `gateway.pipeline` drives it; nothing here
knows about gRPC.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.jobs import JobError, JobRecord
from mocap.v1 import common_pb2, exporter_pb2, smoother_pb2
from mocap_common.poses import PoseTrackSet

TRACK, SMOOTH, EXPORT = common_pb2.JOB_STAGE_TRACK, common_pb2.JOB_STAGE_SMOOTH, common_pb2.JOB_STAGE_EXPORT
STAGE_SERVICE = {TRACK: "tracker", SMOOTH: "smoother", EXPORT: "exporter"}


class StageCallError(Exception):
    """A stage call failed. `kind`: "unavailable" (service unreachable), "timeout" (deadline
    exceeded) or "failed" (the stage answered with an error); `responded`: whether the stage had
    sent anything before failing (then what it sent is thrown away if the call is tried again)."""

    def __init__(self, kind: str, message: str, *, responded: bool, reason: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.responded, self.reason = kind, message, responded, reason
        self.detail = detail or message  # for the log only: may name addresses and transport errors


class StageFailure(Exception):
    """Ends the job FAILED with `reason` (an ErrorReason name) and a message safe to show."""

    def __init__(self, reason: str, message: str, stage: int) -> None:
        super().__init__(message)
        self.error = JobError(reason, message, stage)


# fraction of the stage, frames done, frames total; awaited (it records an event in the store)
ProgressCallback = Callable[[float, int, int], Awaitable[None]]


@dataclass
class TrackOutput:
    tracks: PoseTrackSet  # numpy; video = what the tracker decoded
    undecodable_frames: int = 0  # frames the tracker skipped because they did not decode


@dataclass
class SmoothOutput:
    tracks: PoseTrackSet
    metrics: list[smoother_pb2.SmoothingMetrics]
    method: str


@dataclass
class ExportOutput:
    quality: list[common_pb2.TrackQuality]


class FileSink(Protocol):
    """Where the exporter's files go, one at a time: begin, write..., end."""

    async def begin(self, file: exporter_pb2.ExportedFile) -> None: ...
    async def write(self, offset: int, data: bytes) -> None: ...
    async def end(self) -> None: ...


class Stages(Protocol):
    """The three stage services. Each call raises StageCallError on failure and stops (its
    remote call cancelled) when the calling task is cancelled."""

    async def track(self, job: JobRecord, video: Path, timeout_s: float, progress: ProgressCallback) -> TrackOutput: ...

    async def smooth(self, job: JobRecord, tracks: PoseTrackSet, timeout_s: float,
                     progress: ProgressCallback) -> SmoothOutput: ...

    async def export(self, job: JobRecord, tracks: PoseTrackSet, video: Path | None, sink: FileSink,
                     timeout_s: float, progress: ProgressCallback) -> ExportOutput: ...
