"""One Track call, end to end, without gRPC: bytes in, pose events out, under an inference lease.

    service = TrackingService(settings, models)
    async for event in service.track(TrackJob(job, max_persons, frames_total), chunks):
        LeaseHeld → (Progress | TrackChunk)* → Done

1. wait for a call slot (`max_concurrent_calls`), then acquire an INFERENCE lease from the broker
   (the device to use comes from the lease: `cuda:N` for a GPU, the CPU otherwise);
2. feed the incoming bytes to a ByteFeed from an async task while the pipeline decodes and infers
   in a worker thread (the container is decoded as bytes arrive, or spooled when it needs seeking);
3. before the result is published, ValidateLease confirms the fencing token is still current.

Frames wider or taller than the pipeline's max_aspect_ratio (4:1) are refused with
INVALID_ARGUMENT / UNSUPPORTED_ASPECT_RATIO as soon as the first frame is decoded. Frames that do
not decode are skipped and counted (`Done.undecodable_frames`); past
tracker_svc.video.MAX_UNDECODABLE_FRACTION (10 %) of the video the call is refused with
INVALID_ARGUMENT / VIDEO_DAMAGED.

Each call spools (when it must) inside its own locked directory under `spool_dir`, and the
service removes what killed trackers left there when it starts, before SERVING (tracker_svc.spool).

Every exit path (end, bad video, client cancel, lease loss, shutdown) stops the worker thread
before the lease is released: cancellation sets the pipeline's cancel event and waits for the
thread (the pipeline checks it before every model call, so this takes well under 2 s), the feed is
aborted so a decoder waiting for bytes wakes up, spool directories and CUDA memory are freed by
the pipeline's own `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from mocap_common.lease_client import LeaseLost, lease
from mocap_common.lease_metrics import LeaseRunOutcome
from mocap_common.logs import get_logger
from mocap_common.poses import VideoInfo
from mocap_common.background import EventRuns, run_stoppable_thread
from mocap_common.errors import FieldViolation, InvalidArgument
from tracker_svc.errors import AspectRatioError, TrackingCancelled
from tracker_svc.model_setup import ModelPaths
from tracker_svc.pipeline import Finished, PoseTracker, Progress, TrackChunk, TrackerConfig, TrackerEvent, VideoOpened
from tracker_svc.spool import call_spool_dir, sweep_spool
from tracker_svc.video import ByteFeed

log = get_logger(__name__)

CALLS = Counter("mocap_tracker_calls_total", "Track calls by outcome.", ["outcome"])
ACTIVE = Gauge("mocap_tracker_calls_active", "Track calls holding a lease now.")
FRAMES = Counter("mocap_tracker_frames_total", "Frames decoded and tracked.")
FPS = Histogram("mocap_tracker_call_fps", "Frames per second of finished Track calls.",
                buckets=(1, 5, 10, 20, 30, 50, 75, 100, 200, 400, 800))

_PROGRESS_INTERVAL_S = 0.25  # at most four progress events per second


@dataclass(frozen=True)
class TrackingSettings:
    resource_addr: str
    device: str  # lease device selector
    lease_ttl_s: float
    acquire_timeout_s: float
    max_concurrent_calls: int
    spool_dir: Path
    pipeline: TrackerConfig


@dataclass(frozen=True)
class TrackJob:
    job: str  # "jobs/{job}" for logs and the lease holder, may be empty
    max_persons: int
    frames_total: int  # the caller's frame count, 0 = unknown
    acquire_timeout_s: float | None = None  # the caller's remaining deadline


@dataclass(frozen=True)
class LeaseHeld:
    lease: str
    device: str


@dataclass(frozen=True)
class Done:
    video: VideoInfo
    track_count: int
    device: str
    lease: str
    fencing_token: int
    fps: float
    undecodable_frames: int = 0  # frames skipped because they did not decode


TrackingEvent = LeaseHeld | Progress | TrackChunk | Done


class TrackingService:
    """Runs Track calls; keeps one loaded PoseTracker per device and call slot for reuse."""

    def __init__(self, settings: TrackingSettings, models: ModelPaths) -> None:
        """Also removes the spool directories of dead trackers: this runs before the server starts."""
        self.settings = settings
        self.models = models
        self._slots = asyncio.Semaphore(settings.max_concurrent_calls)
        self._idle: dict[str, list[PoseTracker]] = {}
        self._pool_lock = threading.Lock()
        self._runs: EventRuns[TrackingEvent] = EventRuns(
            lambda: TrackingCancelled("tracking stopped: the tracker is shutting down"))
        removed = sweep_spool(settings.spool_dir)  # each removal is logged with its size
        log.info("spool swept", spool_dir=str(settings.spool_dir), removed=len(removed))

    def load(self, device: str) -> None:
        """Loads (and keeps) a tracker for `device`: readiness means the models really load."""
        self._release_tracker(self._take_tracker(device))

    async def track(self, request: TrackJob, chunks: AsyncIterator[bytes]) -> AsyncIterator[TrackingEvent]:
        """Tracks the video whose bytes `chunks` yields.

        Raises VideoError (undecodable input), LeaseLost, the lease client's ServiceErrors
        (NO_SLOT, broker unavailable) and whatever `chunks` raises. Closing the iterator early
        (the caller went away) stops the work and releases the lease.
        """
        async for event in self._runs.stream(lambda emit: self._call(request, chunks, emit), f"track {request.job}"):
            yield event

    async def close(self) -> None:
        """Stops every call (service shutdown); each releases its lease."""
        await self._runs.close()
        with self._pool_lock:
            for trackers in self._idle.values():
                for tracker in trackers:
                    tracker.close()
            self._idle.clear()

    async def _call(self, request: TrackJob, chunks: AsyncIterator[bytes], emit: Callable[[TrackingEvent], None]) -> None:
        with LeaseRunOutcome(CALLS, log, "track call finished") as run:
            async with self._slots:
                timeout = self.settings.acquire_timeout_s
                if request.acquire_timeout_s is not None:
                    timeout = min(timeout, request.acquire_timeout_s)
                async with lease(self.settings.resource_addr, kind="inference", holder_service="tracker",
                                 job=request.job, device=self.settings.device, ttl_s=self.settings.lease_ttl_s,
                                 acquire_timeout_s=timeout) as held:
                    with ACTIVE.track_inprogress():
                        emit(LeaseHeld(held.name, held.torch_device()))
                        log.info("inference lease held", lease=held.name, device=held.device)
                        video, tracks, fps, undecodable = await self._run_pipeline(
                            request, chunks, held.torch_device(), emit)
                        if not await held.validate():
                            raise LeaseLost(held.name, "ValidateLease says the fencing token is no longer current")
                        emit(Done(video, tracks, held.torch_device(), held.name, held.fencing_token, fps, undecodable))
                        run.succeeded()

    async def _run_pipeline(self, request: TrackJob, chunks: AsyncIterator[bytes], device: str,
                            emit: Callable[[TrackingEvent], None]) -> tuple[VideoInfo, int, float, int]:
        loop = asyncio.get_running_loop()
        feed = ByteFeed()
        feeder = asyncio.create_task(_feed_bytes(chunks, feed), name="track feeder")

        def publish(event: TrackingEvent) -> None:
            loop.call_soon_threadsafe(emit, event)

        def work(stop: threading.Event) -> tuple[VideoInfo, int, float, int]:
            tracker = self._take_tracker(device)
            try:
                # closing(): the decoder (and its spool file) is gone before the call's directory.
                with call_spool_dir(self.settings.spool_dir) as spool, contextlib.closing(tracker.track(
                        feed, cancel=stop, spool_dir=spool, max_persons=request.max_persons)) as events:
                    return _drive(events, request, publish)
            except AspectRatioError as error:
                raise _aspect_refusal(error) from error
            finally:
                self._release_tracker(tracker)

        try:
            # The thread stops before the lease goes: no inference runs outside the lease.
            return await run_stoppable_thread(work, on_stop=lambda: feed.abort(TrackingCancelled("tracking cancelled")))
        finally:
            feeder.cancel()
            outcome = (await asyncio.gather(feeder, return_exceptions=True))[0]
            if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                raise outcome  # the upload side failed (e.g. a second header): report that

    def _take_tracker(self, device: str) -> PoseTracker:
        with self._pool_lock:
            idle = self._idle.setdefault(device, [])
            if idle:
                return idle.pop()
        return PoseTracker(self.models, device=device, config=self.settings.pipeline)

    def _release_tracker(self, tracker: PoseTracker) -> None:
        with self._pool_lock:
            self._idle.setdefault(str(tracker.device), []).append(tracker)


def _aspect_refusal(error: AspectRatioError) -> InvalidArgument:
    """The status for frames the detector cannot cover (its own reason, not DECODE_FAILED)."""
    return InvalidArgument(str(error), reason="UNSUPPORTED_ASPECT_RATIO", violations=[FieldViolation(
        "chunk", f"width/height and height/width must be at most {error.limit:g}")])


async def _feed_bytes(chunks: AsyncIterator[bytes], feed: ByteFeed) -> None:
    """Moves the caller's bytes into the feed (blocking off the event loop when it is full)."""
    try:
        async for chunk in chunks:
            await asyncio.to_thread(feed.feed, chunk)
        feed.finish()
    except BaseException as error:
        feed.abort(error if isinstance(error, Exception) else TrackingCancelled("upload stopped"))
        raise


def _drive(events: Iterator[TrackerEvent], request: TrackJob,
           publish: Callable[[TrackingEvent], None]) -> tuple[VideoInfo, int, float, int]:
    """Runs the pipeline in the worker thread, forwarding chunks and throttled progress; returns
    the decoded video, the track count, the throughput and the undecodable frames skipped."""
    last_progress, fps = -_PROGRESS_INTERVAL_S, 0.0
    track_ids: set[int] = set()
    for event in events:
        if isinstance(event, TrackChunk):
            track_ids.add(event.track.track_id)
            publish(event)
        elif isinstance(event, Progress):
            fps = event.fps
            if event.elapsed_s - last_progress >= _PROGRESS_INTERVAL_S:
                last_progress = event.elapsed_s
                total = request.frames_total or event.frames_total
                publish(Progress(event.frames_done, total, event.elapsed_s, event.fps))
        elif isinstance(event, Finished):
            FRAMES.inc(event.video.frame_count)
            FPS.observe(fps)
            return event.video, len(track_ids), fps, event.stats.undecodable_frames
        elif isinstance(event, VideoOpened):
            log.info("video opened", width=event.video.width, height=event.video.height,
                     fps=round(event.video.fps, 3), frames=event.video.frame_count)
    raise TrackingCancelled("the pipeline ended without a result")


