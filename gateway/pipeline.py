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

The stage services are reached through the `Stages` interface (`gateway.stage_api`;
`gateway.stages` implements it over gRPC); nothing here knows about gRPC. The exporter's files go
through `gateway.artifacts`, the quality report is merged by `gateway.quality` and failure
messages are cleaned by `gateway.messages`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from google.protobuf import json_format
from prometheus_client import Histogram

from gateway.artifacts import ArtifactSink, name_stem
from gateway.events import ProgressThrottle
from gateway.jobs import CANCELLED, FAILED, SUCCEEDED, JobError, JobRecord
from gateway.layout import JobDir
from gateway.messages import safe_message
from gateway.quality import merge_quality
from gateway.stage_api import (
    EXPORT,
    SMOOTH,
    STAGE_SERVICE,
    TRACK,
    ProgressCallback,
    StageCallError,
    StageFailure,
    Stages,
)
from gateway.store import JobStore
from mocap.v1 import common_pb2, gateway_pb2
from mocap_common.files import atomic_write_bytes
from mocap_common.logs import bound_context, get_logger
from mocap_common.posecodec import track_set_to_proto
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
        quality = merge_quality(raw, smoothed, exported.quality, frames_undecodable=tracked.undecodable_frames)
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


def _save_tracks(path: Path, tracks: PoseTrackSet) -> None:
    atomic_write_bytes(path, track_set_to_proto(tracks).SerializeToString())


__all__ = ["CANCELLED", "EXPORT", "SMOOTH", "TRACK", "Pipeline", "RetrySchedule", "StagePolicy"]
