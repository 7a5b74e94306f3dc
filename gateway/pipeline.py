"""One job through the stages: Track → Smooth → Export, to a terminal state on every path.

    RUNNING ─▶ Track (video streamed to the tracker) ─▶ tracks.raw.pb
            ─▶ Smooth (unary, or streamed when large) ─▶ tracks.smooth.pb
            ─▶ Export (tracks, then the video for the preview) ─▶ artifacts/ (size + SHA-256 checked)
            ─▶ quality report + smoothed tracks as artifacts ─▶ SUCCEEDED

Each stage call waits for a slot of its stage (per-stage concurrency), runs under a deadline
(the stage's own, bounded by what is left of the job's), and is retried with backoff only when
the stage's service is unreachable before it answered anything. A failure ends the job FAILED
with a reason and a message safe to show; cancellation ends it CANCELLED (or FAILED INTERRUPTED
when the gateway is stopping). Intermediates are removed on every path but success.

The stage services are reached through the `Stages` interface (`gateway.stages` implements it
over gRPC); nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
from google.protobuf import json_format
from prometheus_client import Histogram

from gateway.events import ProgressThrottle
from gateway.jobs import CANCELLED, FAILED, SUCCEEDED, JobError, JobRecord, artifact_name, is_safe_file_name
from gateway.layout import JobDir
from gateway.store import JobStore
from mocap.v1 import common_pb2, exporter_pb2, gateway_pb2, smoother_pb2
from mocap_common.files import atomic_write_bytes, fsync_dir
from mocap_common.logs import bound_context, get_logger
from mocap_common.posecodec import track_set_to_proto
from mocap_common.poses import LANDMARK_NAMES, PoseTrackSet

log = get_logger(__name__)

TRACK, SMOOTH, EXPORT = common_pb2.JOB_STAGE_TRACK, common_pb2.JOB_STAGE_SMOOTH, common_pb2.JOB_STAGE_EXPORT
STAGE_SERVICE = {TRACK: "tracker", SMOOTH: "smoother", EXPORT: "exporter"}
# Share of the job's progress each stage covers: (start, end).
STAGE_SPAN = {TRACK: (0.0, 0.70), SMOOTH: (0.70, 0.75), EXPORT: (0.75, 1.0)}

STAGE_SECONDS = Histogram("mocap_gateway_stage_seconds", "Duration of stage calls, by stage and outcome.",
                          ["stage", "outcome"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800))

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# What the stages return, and how they fail


class StageCallError(Exception):
    """A stage call failed. `kind`: "unavailable" (service unreachable), "timeout" (deadline
    exceeded) or "failed" (the stage answered with an error); `responded`: whether the stage had
    sent anything before failing (then it is not retried)."""

    def __init__(self, kind: str, message: str, *, responded: bool, reason: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.responded, self.reason = kind, message, responded, reason


class StageFailure(Exception):
    """Ends the job FAILED with `reason` (an ErrorReason name) and a message safe to show."""

    def __init__(self, reason: str, message: str, stage: int) -> None:
        super().__init__(message)
        self.error = JobError(reason, message, stage)


ProgressCallback = Callable[[float, int, int], None]  # fraction of the stage, frames done, frames total


@dataclass
class TrackOutput:
    tracks: PoseTrackSet  # numpy; video = what the tracker decoded


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


@dataclass(frozen=True)
class StagePolicy:
    timeout_s: dict[int, float]
    concurrency: dict[int, int]
    job_timeout_s: float
    attempts: int
    backoff_s: float
    addresses: dict[int, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """Runs RUNNING jobs to their end. `cancelled_as(job_id)` tells how a cancelled job ends:
    (CANCELLED, CANCELLED error) for a client's CancelJob, (FAILED, INTERRUPTED) on shutdown."""

    def __init__(self, store: JobStore, stages: Stages, jobs_root: Path, policy: StagePolicy,
                 cancelled_as: Callable[[str], tuple[int, JobError]]) -> None:
        self._store = store
        self._stages = stages
        self._jobs_root = jobs_root
        self._policy = policy
        self._slots = {stage: asyncio.Semaphore(n) for stage, n in policy.concurrency.items()}
        self._cancelled_as = cancelled_as

    async def run(self, job: JobRecord) -> None:
        """Processes `job` (already RUNNING) and records its terminal state."""
        job_dir = JobDir(self._jobs_root, job.job_id)
        with bound_context(job=job.job_id):
            try:
                artifacts, quality = await self._process(job, job_dir)
            except asyncio.CancelledError:
                state, error = self._cancelled_as(job.job_id)
                self._end(job, job_dir, state, error)
                raise
            except StageFailure as failure:
                self._end(job, job_dir, FAILED, failure.error)
            except Exception:  # noqa: BLE001 - any bug still ends the job, with nothing leaked
                log.exception("job failed unexpectedly")
                self._end(job, job_dir, FAILED, JobError("INTERNAL", "internal error in the gateway; the server log has details"))
            else:
                job_dir.raw_tracks.unlink(missing_ok=True)
                if self._store.transition(job.job_id, SUCCEEDED, artifacts=artifacts, quality=quality) is None:
                    job_dir.remove_intermediates()  # cancelled at the last moment: nothing may remain
                else:
                    log.info("job succeeded", artifacts=len(artifacts))

    def _end(self, job: JobRecord, job_dir: JobDir, state: int, error: JobError) -> None:
        # Synchronous on purpose: a second cancellation cannot interrupt it.
        job_dir.remove_intermediates()
        if error.reason == "INTERRUPTED" and not error.stage:
            current = self._store.get_job(job.job_id)
            error = JobError(error.reason, error.message, current.stage if current else 0)
        if self._store.transition(job.job_id, state, error=error) is not None:
            log.info("job ended", state=common_pb2.JobState.Name(state), reason=error.reason, message=error.message)

    async def _process(self, job: JobRecord, job_dir: JobDir) -> tuple[tuple[common_pb2.Artifact, ...], common_pb2.QualityReport]:
        deadline = time.monotonic() + self._policy.job_timeout_s
        throttle = ProgressThrottle()
        video_path = job_dir.input(job.input_name)

        tracked = await self._stage(job, TRACK, deadline, throttle,
                                    lambda timeout, progress: self._stages.track(job, video_path, timeout, progress))
        raw = tracked.tracks
        if not raw.tracks:
            raise StageFailure("NO_PERSON", "no person was found in the video", TRACK)
        await asyncio.to_thread(_save_tracks, job_dir.raw_tracks, raw)

        smoothed = await self._stage(job, SMOOTH, deadline, throttle,
                                     lambda timeout, progress: self._stages.smooth(job, raw, timeout, progress))
        await asyncio.to_thread(_save_tracks, job_dir.smooth_tracks, smoothed.tracks)

        preview_video = None if job.options.skip_preview else video_path
        sink = ArtifactSink(job, job_dir)
        exported = await self._stage(
            job, EXPORT, deadline, throttle,
            lambda timeout, progress: sink.fresh_attempt(
                self._stages.export(job, smoothed.tracks, preview_video, sink, timeout, progress)),
        )
        quality = merge_quality(raw, smoothed, exported.quality)
        stem = name_stem(job.display_filename)
        sink.add_file(f"{stem}-quality.json", common_pb2.ARTIFACT_KIND_QUALITY_REPORT, "application/json",
                      json_format.MessageToJson(quality).encode())
        await asyncio.to_thread(sink.adopt_file, job_dir.smooth_tracks, f"{stem}-tracks.pb",
                                common_pb2.ARTIFACT_KIND_POSE_TRACKS, "application/x-protobuf")
        return tuple(sink.artifacts), quality

    async def _stage(self, job: JobRecord, stage: int, deadline: float, throttle: ProgressThrottle,
                     call: Callable[[float, ProgressCallback], Awaitable[T]]) -> T:
        """One stage with its slot, deadline, retry budget and events."""
        service = STAGE_SERVICE[stage]
        self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_STARTED, fraction=0.0)
        delay = self._policy.backoff_s
        for attempt in range(1, self._policy.attempts + 1):
            async with self._slots[stage]:
                timeout = min(self._policy.timeout_s[stage], deadline - time.monotonic())
                if timeout <= 0:
                    raise StageFailure("STAGE_TIMEOUT", f"the job ran out of time before the {service} stage finished", stage)
                started = time.monotonic()
                try:
                    result = await call(timeout, self._progress_callback(job, stage, throttle))
                except StageCallError as exc:
                    STAGE_SECONDS.labels(service, exc.kind).observe(time.monotonic() - started)
                    if exc.kind != "unavailable" or exc.responded or attempt == self._policy.attempts:
                        raise self._failure(stage, exc, attempt, timeout) from None
                    detail = exc.message
                    retry_message = (f"the {service} service is unavailable; "
                                     f"retry {attempt + 1} of {self._policy.attempts} in {delay:g} s")
                else:
                    STAGE_SECONDS.labels(service, "ok").observe(time.monotonic() - started)
                    self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED, fraction=1.0)
                    return result
            log.warning("stage unavailable; retrying", stage=service, attempt=attempt, detail=detail)
            self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY, fraction=0.0, message=retry_message)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _failure(self, stage: int, exc: StageCallError, attempts: int, timeout_s: float) -> StageFailure:
        service = STAGE_SERVICE[stage]
        if exc.kind == "unavailable":
            # Where it was looked for and why it failed are for operators (the log), not clients.
            log.warning("stage unavailable", stage=service, address=self._policy.addresses.get(stage, ""),
                        attempts=attempts, detail=exc.message)
            return StageFailure("STAGE_UNAVAILABLE",
                                f"the {service} service could not be reached after {attempts} "
                                f"attempt{'s' if attempts > 1 else ''}; try again later", stage)
        if exc.kind == "timeout":
            return StageFailure("STAGE_TIMEOUT", f"the {service} stage did not finish within its deadline of {timeout_s:.0f} s", stage)
        detail = f" [{exc.reason}]" if exc.reason else ""
        return StageFailure("STAGE_FAILED", f"the {service} stage failed: {_safe(exc.message)}{detail}", stage)

    def _progress_callback(self, job: JobRecord, stage: int, throttle: ProgressThrottle) -> ProgressCallback:
        def report(fraction: float, frames_done: int = 0, frames_total: int = 0) -> None:
            if throttle.allow(stage, fraction):
                self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_PROGRESS, fraction=fraction,
                                  frames_done=frames_done, frames_total=frames_total)

        return report

    def _stage_event(self, job: JobRecord, stage: int, kind: int, *, fraction: float, frames_done: int = 0,
                     frames_total: int = 0, message: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        start, end = STAGE_SPAN[stage]
        event = gateway_pb2.JobEvent(type=kind, stage=stage, stage_progress=fraction, frames_done=frames_done,
                                     frames_total=frames_total, message=message)
        self._store.record_stage_event(job.job_id, event, start + (end - start) * fraction)


# ---------------------------------------------------------------------------------------------
# Artifacts


class ArtifactSink:
    """Writes the exporter's files into artifacts/: each through a temp file, its size and
    SHA-256 checked against the announcement before it is renamed into place."""

    def __init__(self, job: JobRecord, job_dir: JobDir) -> None:
        self._job = job
        self._dir = job_dir
        self.artifacts: list[common_pb2.Artifact] = []
        self._current: exporter_pb2.ExportedFile | None = None
        self._tmp: Path | None = None
        self._handle = None
        self._digest = hashlib.sha256()
        self._written = 0

    async def fresh_attempt(self, call: Awaitable[T]) -> T:
        """Runs one export attempt; whatever a failed attempt left is removed first."""
        self._reset()
        try:
            return await call
        finally:
            self._close_current()

    def _reset(self) -> None:
        self._close_current()
        for artifact in self.artifacts:
            self._dir.artifact(artifact.name.rsplit("/", 1)[1]).unlink(missing_ok=True)
        self.artifacts.clear()

    async def begin(self, file: exporter_pb2.ExportedFile) -> None:
        if self._current is not None:
            await self.end()
        name = file.filename
        if not is_safe_file_name(name):
            raise StageFailure("STAGE_FAILED", "the exporter sent a file with an unsafe name", EXPORT)
        if any(a.filename == name for a in self.artifacts):
            raise StageFailure("STAGE_FAILED", f"the exporter sent {name!r} twice", EXPORT)
        if file.size_bytes < 0 or not re.fullmatch(r"[0-9a-f]{64}", file.sha256):
            raise StageFailure("STAGE_FAILED", f"the exporter announced {name!r} without a valid size and SHA-256", EXPORT)
        self._dir.artifacts.mkdir(exist_ok=True)
        self._tmp = self._dir.artifact(f"{name}.part")
        self._handle = open(self._tmp, "wb")  # noqa: SIM115 - closed in end() / _close_current()
        self._current, self._digest, self._written = file, hashlib.sha256(), 0

    async def write(self, offset: int, data: bytes) -> None:
        file = self._current
        if file is None or self._handle is None:
            raise StageFailure("STAGE_FAILED", "the exporter sent file bytes before announcing the file", EXPORT)
        if offset != self._written or self._written + len(data) > file.size_bytes:
            raise StageFailure("STAGE_FAILED", f"the exporter sent {file.filename!r} out of order or too long", EXPORT)
        await asyncio.to_thread(self._handle.write, data)
        self._digest.update(data)
        self._written += len(data)

    async def end(self) -> None:
        """Finishes the announced file (called before the next file and after the last)."""
        file, handle, tmp = self._current, self._handle, self._tmp
        if file is None or handle is None or tmp is None:
            return
        self._current, self._handle, self._tmp = None, None, None
        try:
            if self._written != file.size_bytes or self._digest.hexdigest() != file.sha256:
                raise StageFailure("STAGE_FAILED",
                                   f"the exporter's file {file.filename!r} arrived corrupt (size or SHA-256 mismatch)", EXPORT)
            await asyncio.to_thread(_fsync_close, handle)
            os.replace(tmp, self._dir.artifact(file.filename))
        except BaseException:
            handle.close()
            tmp.unlink(missing_ok=True)
            raise
        self._record(file.filename, file.kind, file.track_id, file.size_bytes, file.sha256, file.media_type)

    def add_file(self, name: str, kind: int, media_type: str, data: bytes) -> None:
        """Adds a file the gateway itself makes."""
        self._check_free(name)
        path = self._dir.artifact(name)
        atomic_write_bytes(path, data)
        self._record(name, kind, 0, len(data), hashlib.sha256(data).hexdigest(), media_type)

    def adopt_file(self, source: Path, name: str, kind: int, media_type: str) -> None:
        """Moves a file of the job's directory into artifacts/ (same file system: a rename)."""
        self._check_free(name)
        self._dir.artifacts.mkdir(exist_ok=True)
        digest, size = _sha256_and_size(source)
        os.replace(source, self._dir.artifact(name))
        fsync_dir(self._dir.artifacts)
        self._record(name, kind, 0, size, digest, media_type)

    def _check_free(self, name: str) -> None:
        if any(a.filename == name for a in self.artifacts):
            raise StageFailure("STAGE_FAILED", f"the exporter sent a file named {name!r}, which the gateway writes itself", EXPORT)

    def _record(self, name: str, kind: int, track_id: int, size: int, sha256: str, media_type: str) -> None:
        self.artifacts.append(common_pb2.Artifact(
            name=artifact_name(self._job.job_id, name), kind=kind, track_id=track_id, size_bytes=size,
            sha256=sha256, media_type=media_type, filename=name))

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._current, self._handle, self._tmp = None, None, None


def _fsync_close(handle) -> None:  # type: ignore[no-untyped-def]
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _sha256_and_size(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _save_tracks(path: Path, tracks: PoseTrackSet) -> None:
    atomic_write_bytes(path, track_set_to_proto(tracks).SerializeToString())


# ---------------------------------------------------------------------------------------------
# Quality


def merge_quality(raw: PoseTrackSet, smoothed: SmoothOutput, exported: list[common_pb2.TrackQuality]) -> common_pb2.QualityReport:
    """The job's quality report: the exporter's figures per track, with the smoother's metrics
    (jitter, displacement, coverage) and the tracker's confidence merged in."""
    by_id: dict[int, common_pb2.TrackQuality] = {}
    for q in exported:
        by_id[q.track_id] = common_pb2.TrackQuality()
        by_id[q.track_id].CopyFrom(q)
    raw_by_id = {t.track_id: t for t in raw.tracks}
    for track in raw.tracks:
        q = by_id.setdefault(track.track_id, common_pb2.TrackQuality(track_id=track.track_id))
        q.frames_tracked = q.frames_tracked or len(track)
    for m in smoothed.metrics:
        q = by_id.setdefault(m.track_id, common_pb2.TrackQuality(track_id=m.track_id))
        q.jitter_before_mm = m.jitter_before_mm
        q.jitter_after_mm = m.jitter_after_mm
        q.mean_displacement_mm = m.mean_displacement_mm
        if not q.joints and len(m.joint_coverage) == len(LANDMARK_NAMES):
            track = raw_by_id.get(m.track_id)
            confidence = track.image[:, :, 3].mean(axis=0) if track is not None and len(track) else np.zeros(len(LANDMARK_NAMES))
            q.joints.extend(common_pb2.JointQuality(name=name, coverage=float(cov), mean_confidence=float(conf))
                            for name, cov, conf in zip(LANDMARK_NAMES, m.joint_coverage, confidence, strict=True))
    return common_pb2.QualityReport(tracks=[by_id[k] for k in sorted(by_id)], smoothing_method=smoothed.method)


def name_stem(display_filename: str) -> str:
    """A base for artifact names from the client's file name: letters, digits, '-', '_' only."""
    stem = display_filename.rsplit(".", 1)[0] if "." in display_filename.lstrip(".") else display_filename
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:64]
    return cleaned or "take"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*")


def _safe(message: str) -> str:
    """A stage's message fit to show a client: one line, no server paths, bounded length."""
    text = _ABS_PATH.sub("<path>", _CONTROL.sub(" ", message)).strip()
    return text[:300] or "no detail given"


__all__ = ["CANCELLED", "Pipeline", "Stages", "StageCallError", "StageFailure", "StagePolicy"]
