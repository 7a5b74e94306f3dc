"""One job through the stages: Track → Smooth → Export, to a terminal state on every path.

    RUNNING ─▶ Track (video streamed to the tracker) ─▶ tracks.raw.pb
            ─▶ Smooth (unary, or streamed when large) ─▶ tracks.smooth.pb
            ─▶ Export (tracks, then the video for the preview) ─▶ artifacts/ (size + SHA-256 checked)
            ─▶ quality report + smoothed tracks as artifacts ─▶ SUCCEEDED

Each stage call waits for a slot of its stage (per-stage concurrency), runs under a deadline
(the stage's own, bounded by what is left of the job's), and is retried only when the stage's
service was unavailable — not reachable, or gone in the middle of the call (a replica that died:
the next try goes to another replica through the channel's round robin; what the failed try had
sent is thrown away and made again whole) — with exponential backoff and jitter, for as long as
the stage's retry budget (sized to cover a restart of its service) lasts, each retry announced by a STAGE_RETRY event (attempt,
reason, delay). A failure ends the job FAILED with a reason and a message safe to show (no
addresses, paths or gRPC transport text: `safe_message`); a client's cancellation ends it CANCELLED. Intermediates are removed on every path that ends the
job but success; a job handed back (the gateway stops) or whose claim was lost keeps them for
whoever resumes it.

Resuming: after Track and after Smooth the stage's tracks are written to the job's directory
(atomically: temp file, fsync, rename) and the stage is recorded as the job's checkpoint in the
store, with what else the stage returned (`StageCheckpoint`). A job taken over by another replica
(or by this gateway after a restart) starts after its checkpoint: a finished Track is never run
again. The job's deadline counts from when it first became RUNNING, whichever replica runs it.
Every store write names the job's claim token, so a replica that lost its claim writes nothing.

The stage services are reached through the `Stages` interface (`gateway.stage_api`;
`gateway.stages` implements it over gRPC); nothing here knows about gRPC. The exporter's files go
through `gateway.artifacts`, the quality report is merged by `gateway.quality` and failure
messages are cleaned by `gateway.messages`.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from prometheus_client import Histogram

from gateway.artifacts import ArtifactSink, name_stem
from gateway.events import ProgressThrottle
from gateway.jobs import CANCELLED, FAILED, SUCCEEDED, JobError, JobRecord, now_us
from gateway.layout import JobDir
from gateway.messages import safe_message
from gateway.quality import merge_quality
from gateway.stage_api import (
    EXPORT,
    SMOOTH,
    STAGE_SERVICE,
    TRACK,
    ProgressCallback,
    SmoothOutput,
    StageCallError,
    StageFailure,
    Stages,
)
from gateway.store import JobStore
from mocap.v1 import common_pb2, gateway_pb2, smoother_pb2
from mocap_common.files import atomic_write_bytes
from mocap_common.logs import bound_context, get_logger
from mocap_common.posecodec import track_set_from_proto, track_set_to_proto
from mocap_common.procs import finish_uncancellable
from mocap_common.poses import PoseTrackSet

log = get_logger(__name__)

# Share of the job's progress each stage covers: (start, end).
STAGE_SPAN = {TRACK: (0.0, 0.70), SMOOTH: (0.70, 0.75), EXPORT: (0.75, 1.0)}

STAGE_SECONDS = Histogram("mocap_gateway_stage_seconds", "Duration of stage calls, by stage and outcome.",
                          ["stage", "outcome"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800))

T = TypeVar("T")


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

CANCELLED_BY_CLIENT = JobError("CANCELLED", "cancelled at the client's request")


class ClaimLost(Exception):
    """The store refused a write of the job's claim: it was cancelled or taken over elsewhere."""


class Outcome(enum.Enum):
    """What a job whose task was cancelled becomes."""

    CANCELLED = "cancelled"  # the client's CancelJob: CANCELLED, intermediates removed
    HAND_BACK = "hand_back"  # this replica stops: claim released, files kept for whoever resumes
    LOST = "lost"  # the claim is gone (ended, cancelled or taken over elsewhere): write nothing


class Pipeline:
    """Runs claimed jobs to their end. `outcome(job_id)` tells what a job whose task was
    cancelled becomes (the orchestrator knows why it cancelled it)."""

    def __init__(self, store: JobStore, stages: Stages, jobs_root: Path, policy: StagePolicy,
                 outcome: Callable[[str], "Outcome"]) -> None:
        self._store = store
        self._stages = stages
        self._jobs_root = jobs_root
        self._policy = policy
        self._slots = {stage: asyncio.Semaphore(n) for stage, n in policy.concurrency.items()}
        self._outcome = outcome

    async def run(self, job: JobRecord) -> None:
        """Processes `job` (claimed, RUNNING) and records its terminal state — or hands it back."""
        job_dir = JobDir(self._jobs_root, job.job_id)
        with bound_context(job=job.job_id):
            try:
                artifacts, quality = await self._process(job, job_dir)
            except asyncio.CancelledError:
                await finish_uncancellable(self._stopped(job, job_dir))
                raise
            except ClaimLost:
                await finish_uncancellable(self._claim_lost(job_dir))
            except StageFailure as failure:
                await finish_uncancellable(self._end(job, job_dir, FAILED, failure.error))
            except Exception:  # noqa: BLE001 - any bug still ends the job, with nothing leaked
                log.exception("job failed unexpectedly")
                await finish_uncancellable(self._end(
                    job, job_dir, FAILED, JobError("INTERNAL", "internal error in the gateway; the server log has details")))
            else:
                await finish_uncancellable(self._succeed(job, job_dir, artifacts, quality))

    async def _succeed(self, job: JobRecord, job_dir: JobDir, artifacts: tuple[common_pb2.Artifact, ...],
                       quality: common_pb2.QualityReport) -> None:
        if await self._store.transition(job.job_id, SUCCEEDED, artifacts=artifacts, quality=quality,
                                        claim_token=job.claim_token) is None:
            await self._claim_lost(job_dir)  # cancelled at the last moment, or taken over
            return
        job_dir.remove_tracks()
        log.info("job succeeded", artifacts=len(artifacts))

    async def _stopped(self, job: JobRecord, job_dir: JobDir) -> None:
        """The job's task was cancelled: by the client, by this gateway stopping, or because the
        claim is gone."""
        outcome = self._outcome(job.job_id)
        if outcome is Outcome.CANCELLED:
            await self._end(job, job_dir, CANCELLED, CANCELLED_BY_CLIENT)
        elif outcome is Outcome.HAND_BACK:
            await self._store.release_claim(job.job_id, job.claim_token)
            log.info("job handed back for another replica (or the next start) to resume")
        else:
            await self._claim_lost(job_dir)

    async def _claim_lost(self, job_dir: JobDir) -> None:
        """The store refused a write of this claim: the job ended elsewhere (cancelled, deleted) —
        then its files are removed here — or another replica took it over, and they are its."""
        current = await self._store.get_job(job_dir.job_id)
        if current is None or current.terminal:
            job_dir.remove_intermediates()

    async def _end(self, job: JobRecord, job_dir: JobDir, state: int, error: JobError) -> None:
        ended = await self._store.transition(job.job_id, state, error=error, claim_token=job.claim_token)
        if ended is None:
            await self._claim_lost(job_dir)
        else:
            job_dir.remove_intermediates()
            log.info("job ended", state=common_pb2.JobState.Name(state), reason=error.reason, message=error.message)

    async def _process(self, job: JobRecord, job_dir: JobDir) -> tuple[tuple[common_pb2.Artifact, ...], common_pb2.QualityReport]:
        deadline = time.monotonic() + self._policy.job_timeout_s - max(0.0, (now_us() - job.start_us) / 1e6)
        throttle = ProgressThrottle()
        video_path = job_dir.input(job.input_name)
        checkpoint = StageCheckpoint.parse(job.checkpoint)
        job_dir.remove_temp_files()  # half-written by an earlier owner that died
        resumed = await asyncio.to_thread(_load_resumable, job, job_dir)

        if resumed.raw is None:
            tracked = await self._stage(job, TRACK, deadline, throttle,
                                        lambda timeout, progress: self._stages.track(job, video_path, timeout, progress))
            raw = tracked.tracks
            if not raw.tracks:
                raise StageFailure("NO_PERSON", "no person was found in the video", TRACK)
            await asyncio.to_thread(_save_tracks, job_dir.raw_tracks, raw)
            checkpoint = StageCheckpoint(undecodable_frames=tracked.undecodable_frames)
            await self._checkpoint(job, TRACK, checkpoint)
        else:
            raw = resumed.raw

        if resumed.smoothed is None:
            smoothed = await self._stage(job, SMOOTH, deadline, throttle,
                                         lambda timeout, progress: self._stages.smooth(job, raw, timeout, progress))
            await asyncio.to_thread(_save_tracks, job_dir.smooth_tracks, smoothed.tracks)
            checkpoint = replace(checkpoint, smooth_method=smoothed.method, smooth_metrics=tuple(smoothed.metrics))
            await self._checkpoint(job, SMOOTH, checkpoint)
        else:
            smoothed = SmoothOutput(resumed.smoothed, list(checkpoint.smooth_metrics), checkpoint.smooth_method)

        preview_video = None if job.options.skip_preview else video_path
        sink = ArtifactSink(job, job_dir)
        sink.clear()  # what an earlier owner of the job may have left half-written
        exported = await self._stage(
            job, EXPORT, deadline, throttle,
            lambda timeout, progress: sink.fresh_attempt(
                self._stages.export(job, smoothed.tracks, preview_video, sink, timeout, progress)),
        )
        quality = merge_quality(raw, smoothed, exported.quality, frames_undecodable=checkpoint.undecodable_frames)
        stem = name_stem(job.display_filename)
        sink.add_file(f"{stem}-quality.json", common_pb2.ARTIFACT_KIND_QUALITY_REPORT, "application/json",
                      json_format.MessageToJson(quality).encode())
        await asyncio.to_thread(sink.copy_file, job_dir.smooth_tracks, f"{stem}-tracks.pb",
                                common_pb2.ARTIFACT_KIND_POSE_TRACKS, "application/x-protobuf")
        return tuple(sink.artifacts), quality

    async def _checkpoint(self, job: JobRecord, stage: int, checkpoint: "StageCheckpoint") -> None:
        if not await self._store.record_checkpoint(job.job_id, job.claim_token, stage, checkpoint.to_bytes()):
            raise ClaimLost(job.job_id)

    async def _stage(self, job: JobRecord, stage: int, deadline: float, throttle: ProgressThrottle,
                     call: Callable[[float, ProgressCallback], Awaitable[T]]) -> T:
        """One stage with its slot, deadline, retry budget and events."""
        service = STAGE_SERVICE[stage]
        await self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_STARTED, fraction=0.0)
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
                    # An unavailable stage is tried again even when it had answered: a replica
                    # that died mid-call. Whatever it had sent is dropped with the attempt (the
                    # call's output is assembled whole, the export sink starts afresh).
                    retryable = exc.kind == "unavailable"
                    delay = retry.next_delay(attempt) if retryable else None
                    if delay is None:
                        raise self._failure(stage, exc, attempt, timeout, retry.elapsed_s()) from None
                    detail, responded = exc.detail, exc.responded
                else:
                    STAGE_SECONDS.labels(service, "ok").observe(time.monotonic() - started)
                    await self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED, fraction=1.0)
                    return result
            left = max(0.0, retry.budget_s - retry.elapsed_s())
            # The detail (address, transport text) is for operators; the event says it in safe words.
            log.warning("stage unavailable; retrying", stage=service, attempt=attempt, next_try_in_s=round(delay, 3),
                        budget_left_s=round(left, 3), address=policy.addresses.get(stage, ""), detail=detail)
            budget = f"; {left:.1f} s of its {retry.budget_s:g} s retry budget left" if retry.budget_s != float("inf") else ""
            when = "in the middle of the call" if responded else "before it answered"
            await self._stage_event(
                job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_RETRY, fraction=0.0, attempt=attempt,
                retry_delay_s=delay, reason="STAGE_UNAVAILABLE",
                message=(f"the {service} service became unavailable (not reachable, not ready, or gone) {when}; "
                         f"attempt {attempt} failed, next try in {delay:.1f} s{budget}"))
            await asyncio.sleep(delay)

    def _failure(self, stage: int, exc: StageCallError, attempts: int, timeout_s: float, retried_s: float = 0.0) -> StageFailure:
        service = STAGE_SERVICE[stage]
        if exc.kind == "unavailable":
            # Where it was looked for and why it failed are for operators (the log), not clients.
            log.warning("stage unavailable", stage=service, address=self._policy.addresses.get(stage, ""),
                        attempts=attempts, retried_s=round(retried_s, 3), responded=exc.responded, detail=exc.detail)
            over = f" over {retried_s:.1f} s" if attempts > 1 else ""
            if exc.responded:
                return StageFailure("STAGE_UNAVAILABLE",
                                    f"the {service} service became unavailable while it was working on the job, and "
                                    f"no replica of it took the call over after {attempts} attempt{'s' if attempts > 1 else ''}"
                                    f"{over}; try again later", stage)
            return StageFailure("STAGE_UNAVAILABLE",
                                f"the {service} service could not be reached after {attempts} "
                                f"attempt{'s' if attempts > 1 else ''}{over}; try again later", stage)
        log.warning("stage failed", stage=service, kind=exc.kind, reason=exc.reason, attempts=attempts, detail=exc.detail)
        if exc.kind == "timeout":
            return StageFailure("STAGE_TIMEOUT", f"the {service} stage did not finish within its deadline of {timeout_s:.0f} s", stage)
        detail = f" [{exc.reason}]" if exc.reason else ""
        return StageFailure("STAGE_FAILED", f"the {service} stage failed: {safe_message(exc.message)}{detail}", stage)

    def _progress_callback(self, job: JobRecord, stage: int, throttle: ProgressThrottle) -> ProgressCallback:
        async def report(fraction: float, frames_done: int = 0, frames_total: int = 0) -> None:
            if throttle.allow(stage, fraction):
                await self._stage_event(job, stage, gateway_pb2.JOB_EVENT_TYPE_STAGE_PROGRESS, fraction=fraction,
                                  frames_done=frames_done, frames_total=frames_total)

        return report

    async def _stage_event(self, job: JobRecord, stage: int, kind: int, *, fraction: float, frames_done: int = 0,
                     frames_total: int = 0, message: str = "", attempt: int = 0, retry_delay_s: float | None = None,
                     reason: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        start, end = STAGE_SPAN[stage]
        event = gateway_pb2.JobEvent(type=kind, stage=stage, stage_progress=fraction, frames_done=frames_done,
                                     frames_total=frames_total, message=message, attempt=attempt, reason=reason)
        if retry_delay_s is not None:
            event.retry_delay.FromNanoseconds(int(retry_delay_s * 1e9))
        await self._store.record_stage_event(job.job_id, event, start + (end - start) * fraction, claim_token=job.claim_token)


def _save_tracks(path: Path, tracks: PoseTrackSet) -> None:
    atomic_write_bytes(path, track_set_to_proto(tracks).SerializeToString())


def _load_tracks(path: Path) -> PoseTrackSet:
    return track_set_from_proto(common_pb2.PoseTrackSet.FromString(path.read_bytes()))


@dataclass(frozen=True)
class StageCheckpoint:
    """What the finished stages returned beside their tracks (which are files in the job's
    directory), stored with the job so a replica that takes it over can go on after them."""

    undecodable_frames: int = 0
    smooth_method: str = ""
    smooth_metrics: tuple[smoother_pb2.SmoothingMetrics, ...] = ()

    def to_bytes(self) -> bytes:
        return json.dumps({
            "undecodable_frames": self.undecodable_frames,
            "smooth_method": self.smooth_method,
            "smooth_metrics": [base64.b64encode(m.SerializeToString()).decode() for m in self.smooth_metrics],
        }).encode()

    @classmethod
    def parse(cls, data: bytes) -> "StageCheckpoint":
        if not data:
            return cls()
        raw = json.loads(data)
        return cls(int(raw["undecodable_frames"]), str(raw["smooth_method"]),
                   tuple(smoother_pb2.SmoothingMetrics.FromString(base64.b64decode(m)) for m in raw["smooth_metrics"]))


@dataclass(frozen=True)
class Resumable:
    """The stored output of the stages a job already finished (None = run the stage)."""

    raw: PoseTrackSet | None = None
    smoothed: PoseTrackSet | None = None


def _load_resumable(job: JobRecord, job_dir: JobDir) -> Resumable:
    """The finished stages' tracks of a job taken over. A checkpoint whose file is gone (or
    unreadable) counts as not done: that stage runs again."""
    if job.completed_stage < TRACK:
        return Resumable()
    try:
        raw = _load_tracks(job_dir.raw_tracks)
    except (OSError, ValueError, DecodeError) as exc:
        log.warning("stored tracks unusable; tracking again", error=str(exc))
        return Resumable()
    if job.completed_stage < SMOOTH:
        return Resumable(raw)
    try:
        return Resumable(raw, _load_tracks(job_dir.smooth_tracks))
    except (OSError, ValueError, DecodeError) as exc:
        log.warning("stored smoothed tracks unusable; smoothing again", error=str(exc))
        return Resumable(raw)


__all__ = ["CANCELLED", "CANCELLED_BY_CLIENT", "EXPORT", "SMOOTH", "TRACK", "Outcome", "Pipeline", "RetrySchedule", "StagePolicy"]
