"""One job through the stages: Track → Smooth → Export, to a terminal state on every path.

    RUNNING ─▶ Track (video streamed to the tracker) ─▶ tracks.raw.pb
            ─▶ Smooth (unary, or streamed when large) ─▶ tracks.smooth.pb
            ─▶ Export (tracks, then the video for the preview) ─▶ artifacts/ (size + SHA-256 checked)
            ─▶ quality report + smoothed tracks as artifacts ─▶ SUCCEEDED

Each stage call waits for a slot of its stage (per-stage concurrency), runs under a deadline
(the stage's own, bounded by what is left of the job's), and is retried only when the stage's
service was unavailable before it answered anything (so no output of it is thrown away and
re-made): with exponential backoff and jitter, for as long as the stage's retry budget (sized to
cover a restart of its service) lasts, each retry announced by a STAGE_RETRY event (attempt,
reason, delay). A failure ends the job FAILED with a reason and a message safe to show (no
addresses, paths or gRPC transport text: `safe_message`); cancellation ends it CANCELLED (or
FAILED INTERRUPTED when the gateway is stopping). Intermediates are removed on every path but
success.

The stage services are reached through the `Stages` interface (`gateway.stages` implements it
over gRPC); nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
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

    def __init__(self, kind: str, message: str, *, responded: bool, reason: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.responded, self.reason = kind, message, responded, reason
        self.detail = detail or message  # for the log only: may name addresses and transport errors


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
    attempts: int  # most tries of one stage
    backoff_s: float  # wait before the first retry; doubles per retry
    backoff_max_s: float = 4.0  # the longest wait between two tries
    retry_budget_s: dict[int, float] = field(default_factory=dict)  # per stage, from the first failure; none = no limit
    addresses: dict[int, str] = field(default_factory=dict)


RETRY_JITTER = 0.25  # each wait is its backoff × a uniform factor in [1 - this, 1 + this]


class RetrySchedule:
    """When to try a stage again: exponential backoff with jitter, within a time budget counted
    from the first failure and a number of attempts."""

    def __init__(self, budget_s: float, first_delay_s: float, max_delay_s: float, max_attempts: int,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s, self._first, self._max, self.max_attempts = budget_s, first_delay_s, max_delay_s, max_attempts
        self._rng = rng or random.Random()
        self._clock = clock
        self._first_failure: float | None = None

    def elapsed_s(self) -> float:
        """Seconds since the first failure (0 before it)."""
        return 0.0 if self._first_failure is None else self._clock() - self._first_failure

    def next_delay(self, failed_attempt: int) -> float | None:
        """The wait before the try after `failed_attempt` (1-based), or None when the budget or the
        attempts are spent. The last wait is shortened to end with the budget, so the stage gets
        one more try at the end of the budget rather than none."""
        now = self._clock()
        if self._first_failure is None:
            self._first_failure = now
        left = self.budget_s - (now - self._first_failure)
        if failed_attempt >= self.max_attempts or left <= 0:
            return None
        backoff = min(self._max, self._first * 2 ** (failed_attempt - 1))
        return max(0.0, min(left, backoff * self._rng.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)))


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
        policy = self._policy
        retry = RetrySchedule(policy.retry_budget_s.get(stage, float("inf")), policy.backoff_s, policy.backoff_max_s,
                              policy.attempts)
        attempt = 0
        while True:
            attempt += 1
            async with self._slots[stage]:
                timeout = min(policy.timeout_s[stage], deadline - time.monotonic())
                if timeout <= 0:
                    raise StageFailure("STAGE_TIMEOUT", f"the job ran out of time before the {service} stage finished", stage)
                started = time.monotonic()
                try:
                    result = await call(timeout, self._progress_callback(job, stage, throttle))
                except StageCallError as exc:
                    STAGE_SECONDS.labels(service, exc.kind).observe(time.monotonic() - started)
                    # Only a stage that answered nothing is tried again: whatever it had sent
                    # would be made a second time (and a stream's output is not idempotent).
                    retryable = exc.kind == "unavailable" and not exc.responded
                    delay = retry.next_delay(attempt) if retryable else None
                    if delay is None:
                        raise self._failure(stage, exc, attempt, timeout, retry.elapsed_s()) from None
                    detail = exc.detail
                else:
                    STAGE_SECONDS.labels(service, "ok").observe(time.monotonic() - started)
                    self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED, fraction=1.0)
                    return result
            left = max(0.0, retry.budget_s - retry.elapsed_s())
            # The detail (address, transport text) is for operators; the event says it in safe words.
            log.warning("stage unavailable; retrying", stage=service, attempt=attempt, next_try_in_s=round(delay, 3),
                        budget_left_s=round(left, 3), address=policy.addresses.get(stage, ""), detail=detail)
            budget = f"; {left:.1f} s of its {retry.budget_s:g} s retry budget left" if retry.budget_s != float("inf") else ""
            self._stage_event(
                job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY, fraction=0.0, attempt=attempt,
                retry_delay_s=delay, reason="STAGE_UNAVAILABLE",
                message=(f"the {service} service is unavailable (not reachable or not ready) before it answered; "
                         f"attempt {attempt} failed, next try in {delay:.1f} s{budget}"))
            await asyncio.sleep(delay)

    def _failure(self, stage: int, exc: StageCallError, attempts: int, timeout_s: float, retried_s: float = 0.0) -> StageFailure:
        service = STAGE_SERVICE[stage]
        if exc.kind == "unavailable":
            # Where it was looked for and why it failed are for operators (the log), not clients.
            log.warning("stage unavailable", stage=service, address=self._policy.addresses.get(stage, ""),
                        attempts=attempts, retried_s=round(retried_s, 3), responded=exc.responded, detail=exc.detail)
            if exc.responded:
                return StageFailure("STAGE_UNAVAILABLE",
                                    f"the {service} service became unavailable while it was working on the job "
                                    "(its work so far is not repeated automatically); try again later", stage)
            over = f" over {retried_s:.1f} s" if attempts > 1 else ""
            return StageFailure("STAGE_UNAVAILABLE",
                                f"the {service} service could not be reached after {attempts} "
                                f"attempt{'s' if attempts > 1 else ''}{over}; try again later", stage)
        log.warning("stage failed", stage=service, kind=exc.kind, reason=exc.reason, attempts=attempts, detail=exc.detail)
        if exc.kind == "timeout":
            return StageFailure("STAGE_TIMEOUT", f"the {service} stage did not finish within its deadline of {timeout_s:.0f} s", stage)
        detail = f" [{exc.reason}]" if exc.reason else ""
        return StageFailure("STAGE_FAILED", f"the {service} stage failed: {safe_message(exc.message)}{detail}", stage)

    def _progress_callback(self, job: JobRecord, stage: int, throttle: ProgressThrottle) -> ProgressCallback:
        def report(fraction: float, frames_done: int = 0, frames_total: int = 0) -> None:
            if throttle.allow(stage, fraction):
                self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_PROGRESS, fraction=fraction,
                                  frames_done=frames_done, frames_total=frames_total)

        return report

    def _stage_event(self, job: JobRecord, stage: int, kind: int, *, fraction: float, frames_done: int = 0,
                     frames_total: int = 0, message: str = "", attempt: int = 0, retry_delay_s: float | None = None,
                     reason: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        start, end = STAGE_SPAN[stage]
        event = gateway_pb2.JobEvent(type=kind, stage=stage, stage_progress=fraction, frames_done=frames_done,
                                     frames_total=frames_total, message=message, attempt=attempt, reason=reason)
        if retry_delay_s is not None:
            event.retry_delay.FromNanoseconds(int(retry_delay_s * 1e9))
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


# What `safe_message` removes from a stage's message before a client sees it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# gRPC core's own error texts (a failed connect, a reset stream, its debug strings): from the first
# of these on, the text is the transport's, not the stage's, and is cut.
_GRPC_CORE_TEXT = re.compile(
    r"failed to connect to all addresses|failed to connect to remote host|connection refused|connection reset"
    r"|socket closed|broken pipe|endpoint (?:read|write) failed|stream removed|goaway|keepalive watchdog"
    r"|dns resolution failed|name resolution|no address(?:es)? added|unavailable subchannel|connect(?:ion)? failed"
    r"|transport closed|handshake|received (?:message )?larger than max|sent message larger than max"
    r"|received rst_stream|debug_error_string|grpc_status|grpc_message|created_time|os_error|errno"
    r"|\b(?:recvmsg|sendmsg|connect|getaddrinfo|setsockopt):|\bAioRpcError\b|_InactiveRpcError|\bgrpc_core::",
    re.IGNORECASE)
_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|unix|unix-abstract|vsock|dns|xds|passthrough):[^\s,;()]+"  # gRPC peer and target URIs
    r"|\b[a-z][a-z0-9+.-]*://[^\s,;()]+"  # URLs
    r"|\[[0-9a-f:.%]*:[0-9a-f:.%]*\](?::\d{1,5})?"  # [ipv6]:port
    r"|(?<![\w:.])(?=[0-9a-f:]*::|(?:[0-9a-f]{1,4}:){5})(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])"  # bare ipv6
    r"|(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\w.])"  # ipv4[:port]
    r"|(?<![\w.-])(?:localhost|[a-z0-9-]+(?:\.[a-z0-9-]+)+|[a-z][a-z0-9-]*(?=:\d{2,5}\b)):\d{2,5}\b",  # host:port
    re.IGNORECASE)
_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/(?:[\w.+@-]+/)*[\w.+@-]+/?|(?<![\w])[a-z]:\\[^\s,;()]*", re.IGNORECASE)


def safe_message(message: str) -> str:
    """A stage's message fit to show a client: one line, bounded length, and nothing of the
    servers: no peer addresses (gRPC's "ipv4:…", "ipv6:[…]", host:port, IP literals, URLs), no
    file paths, and no text of gRPC core's own errors (from the first such phrase on, the rest
    is the transport's and is cut). What is removed is in the gateway's log."""
    text = _CONTROL.sub(" ", message)
    cut = _GRPC_CORE_TEXT.search(text)
    if cut is not None:
        text = text[:cut.start()].rstrip(" :;,-(<") + " (transport error)"
    text = _ADDRESS.sub("<address>", text)
    text = _PATH.sub("<path>", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = text[:300]
    text += ")" * max(0, text.count("(") - text.count(")"))  # close what a cut left open
    return text or "no detail given"


__all__ = ["CANCELLED", "Pipeline", "Stages", "StageCallError", "StageFailure", "StagePolicy"]
