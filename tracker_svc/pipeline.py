"""PoseTracker: video in, multi-person 3D pose tracks out, incrementally and cancellably.

    tracker = PoseTracker(model_paths(), device="cpu")
    for event in tracker.track(path_or_bytefeed, cancel=threading.Event()):
        VideoOpened(info) → TrackChunk(piece)* and Progress(...)* per batch → Finished(info)

Per batch of `batch_size` decoded frames (decoding runs ahead in a background thread, at most
`prefetch_batches` batches, so memory does not grow with the video):
1. the detector runs on the batch's first frame when the TrackManager asks for it (nobody
   followed, someone lost, or periodically below `max_persons`); unmatched detections start or
   revive tracks;
2. every followed track gets a region per frame, predicted from its last alignment points;
   all crops of the batch go through the landmark model together (this is what makes the CPU
   fast: the model runs 2-3× faster per crop in batches than one crop at a time);
3. MediaPipe crops each frame from the previous frame's alignment points; batching over frames
   makes us predict instead, so a second look fixes the misses: a crop whose own alignment points
   put the person noticeably off-centre is redone from its own region, and a frame where the
   person was not found is redone from the previous frame's region (MediaPipe's rule);
4. duplicate poses of one person are dropped, and the TrackManager turns the rest into
   stable-id PoseTrack pieces, emitted per batch (`PoseTrack.concatenate` joins them).
The cancel event is checked before every model call and while waiting for the decoder.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo
from tracker_svc import _malloc
from tracker_svc.detector import MAX_COVERED_ASPECT, PoseDetector, auto_tiles
from tracker_svc.errors import AspectRatioError, TrackingCancelled, TrackerError
from tracker_svc.landmarks import LandmarkModel, LandmarkResult
from tracker_svc.model_setup import ModelPaths, model_paths
from tracker_svc.roi import Rois
from tracker_svc.tracking import Observation, Track, TrackingConfig, TrackManager, pose_distance
from tracker_svc.video import ByteFeed, FrameBatch, VideoSource, open_video

_CANCEL_POLL_S = 0.05  # how often a wait for the decoder looks at the cancel event


@dataclass(frozen=True)
class TrackerConfig:
    batch_size: int = 8  # frames per step: decode, crop and infer together
    max_crops_per_call: int = 16  # landmark crops per model call (bounds activation memory)
    prefetch_batches: int = 2  # decoded batches waiting for inference
    detection_tiles: int | None = None  # square tiles searched besides the whole frame; None = auto
    # Frames whose long side exceeds this × the short side are refused (None: any shape): past
    # 4:1 the detector's capped tiles no longer see people at full resolution (detector.MAX_TILES).
    max_aspect_ratio: float | None = MAX_COVERED_ASPECT
    refine_with_heatmap: bool = True  # MediaPipe's heatmap refinement of x, y
    recrop_shift: float = 0.12  # re-crop when the frame's own region centre is off by this × size
    recrop_scale: float = 0.15  # ... or its size differs by this fraction
    recrop_rotation_deg: float = 15.0  # ... or it turned by this much
    decode_threads: int = 0  # FFmpeg decoder threads (0 = FFmpeg's choice)
    brighten_dark: bool = True  # scale up near-black frames before the models (video.DARK_LEVEL)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass(frozen=True)
class VideoOpened:
    video: VideoInfo  # frame_count and duration are the container's estimates


@dataclass(frozen=True)
class Progress:
    frames_done: int
    frames_total: int  # container estimate; 0 when unknown
    elapsed_s: float
    fps: float  # frames tracked per second so far, decode included


@dataclass(frozen=True)
class TrackChunk:
    track: PoseTrack  # frames of one track seen since its previous chunk


@dataclass
class TrackStats:
    """Work done for one video (for benchmarks and logs)."""

    frames: int = 0
    detector_runs: int = 0  # frames searched by the detector
    detector_views: int = 0  # model inputs for those (whole frame + tiles)
    landmark_crops: int = 0  # landmark model inputs, re-crops included
    recrops: int = 0  # crops redone from the frame's own region
    tracks: int = 0  # confirmed tracks
    undecodable_frames: int = 0  # frames skipped because they did not decode (tracker_svc.video)


@dataclass(frozen=True)
class Finished:
    video: VideoInfo  # frame_count and duration as actually decoded
    stats: TrackStats


TrackerEvent = VideoOpened | Progress | TrackChunk | Finished


class PoseTracker:
    """Both BlazePose models loaded on one device; tracks one video at a time per instance."""

    def __init__(
        self,
        models: ModelPaths | None = None,
        *,
        device: torch.device | str | None = None,
        config: TrackerConfig | None = None,
        num_threads: int | None = None,
        tune_malloc: bool = True,
    ) -> None:
        """Loads the models (from the verified cache when `models` is None) onto `device`.

        device: "cpu", "cuda", "cuda:N"; None picks CUDA when torch sees one, else the CPU. Both run
          in float32 (fp16 on CUDA is not used: its parity with LiteRT is unverified).
        num_threads: torch intra-op threads (process-wide); unchanged when None.
        tune_malloc: keep freed large buffers for reuse (see tracker_svc._malloc).
        Raises ModelsMissingError, UnsupportedModelError.
        """
        self.device = torch.device(device if device is not None else default_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrackerError("device cuda requested but torch sees no CUDA device")
        if self.device.type == "cuda":
            # cuDNN's default TF32 convolutions keep ~10 mantissa bits: enough to move landmarks
            # beyond the parity limits tested against LiteRT. True fp32 (process-wide setting).
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.config = config or TrackerConfig()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if tune_malloc:
            _malloc.keep_freed_memory_for_reuse()
        paths = models or model_paths()
        self.detector = PoseDetector(paths.detector, self.device)
        self.landmarks = LandmarkModel(paths.landmark, self.device, refine_with_heatmap=self.config.refine_with_heatmap)
        self._busy = threading.Lock()

    def close(self) -> None:
        """Drops the models; on CUDA their memory goes back to the driver (e.g. before a lease ends)."""
        self.detector = None  # type: ignore[assignment]
        self.landmarks = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "PoseTracker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def track(
        self,
        source: VideoSource,
        *,
        cancel: threading.Event | None = None,
        spool_dir: Path | str | None = None,
        max_persons: int | None = None,
    ) -> Iterator[TrackerEvent]:
        """Tracks a video, yielding events as batches finish.

        source: a path, or a ByteFeed being filled by another thread (decoded as bytes arrive when
          the container allows, else spooled under `spool_dir`).
        cancel: when set, raises TrackingCancelled before the next model call or decoder wait.
        max_persons: overrides the configured number of people followed at once, for this video.
        Raises VideoError (AspectRatioError for frames beyond config.max_aspect_ratio),
        TrackingCancelled. Closing the generator early also stops the decoder,
        removes spool files and frees device memory.
        """
        if not self._busy.acquire(blocking=False):
            raise TrackerError("this PoseTracker is already tracking a video")
        decoder = _Decoder(source, self.config, spool_dir)
        try:
            tracking = self.config.tracking
            if max_persons is not None:
                tracking = replace(tracking, max_persons=max_persons)
            yield from self._run(decoder, cancel or threading.Event(), tracking)
        finally:
            decoder.stop()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._busy.release()

    def track_to_set(self, source: VideoSource, *, cancel: threading.Event | None = None) -> PoseTrackSet:
        """Runs `track` to the end and joins the pieces into one PoseTrackSet (ids ascending)."""
        pieces: dict[int, list[PoseTrack]] = {}
        video = None
        for event in self.track(source, cancel=cancel):
            if isinstance(event, TrackChunk):
                pieces.setdefault(event.track.track_id, []).append(event.track)
            elif isinstance(event, Finished):
                video = event.video
        assert video is not None
        return PoseTrackSet(video=video, tracks=[PoseTrack.concatenate(pieces[k]) for k in sorted(pieces)])

    def _run(self, decoder: "_Decoder", cancel: threading.Event, tracking: TrackingConfig) -> Iterator[TrackerEvent]:
        started = time.perf_counter()
        info = decoder.next_item(cancel)
        assert isinstance(info, VideoInfo)
        check_aspect_ratio(info.width, info.height, self.config.max_aspect_ratio)
        yield VideoOpened(info)
        manager = TrackManager(tracking)
        stats = TrackStats()
        tiles = self.config.detection_tiles
        if tiles is None:
            tiles = auto_tiles(info.width, info.height) if info.width and info.height else 0
        frames_done, last_time = 0, 0.0
        while (batch := decoder.next_item(cancel)) is not None:
            assert isinstance(batch, FrameBatch)
            for height, width in {frame.shape[:2] for frame in batch.rgb}:
                check_aspect_ratio(width, height, self.config.max_aspect_ratio)  # the size may change mid-stream
            # inference_mode per batch, not across the yields: it is thread-local state that
            # would otherwise leak into the consumer's code while the generator is suspended.
            with torch.inference_mode():
                pieces = _BatchStep(self, manager, batch, tiles, stats, cancel).run()
            for piece in pieces:
                yield TrackChunk(piece)
            frames_done += len(batch)
            last_time = float(batch.timestamp_s[-1])
            elapsed = time.perf_counter() - started
            yield Progress(frames_done, info.frame_count, elapsed, frames_done / max(elapsed, 1e-9))
        duration = last_time + (1.0 / info.fps if info.fps else 0.0) if frames_done else 0.0
        stats.frames, stats.tracks = frames_done, manager.confirmed_count
        stats.undecodable_frames = decoder.undecodable_frames
        yield Finished(replace(info, frame_count=frames_done, duration_s=duration), stats)


def check_aspect_ratio(width: int, height: int, limit: float | None) -> None:
    """Raises AspectRatioError when one side exceeds `limit` × the other (an unknown size passes)."""
    if limit is not None and width > 0 and height > 0 and max(width, height) > limit * min(width, height):
        raise AspectRatioError(width, height, limit)


def default_device() -> torch.device:
    """CUDA when torch sees a device, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _BatchStep:
    """Steps 1-4 of the module docstring for one batch."""

    def __init__(
        self, tracker: PoseTracker, manager: TrackManager, batch: FrameBatch, tiles: int,
        stats: TrackStats, cancel: threading.Event,
    ) -> None:
        self.tracker = tracker
        self.cancel = cancel
        self.stats = stats
        self.config = tracker.config
        self.manager = manager
        self.batch = batch
        self.tiles = tiles
        self.frames = _FrameStore(batch.rgb, tracker.device)

    def run(self) -> list[PoseTrack]:
        first = int(self.batch.index[0])
        self._check_cancel()
        if self.manager.needs_detection(first):
            found = self.tracker.detector.detect_frame(self.frames.get(0), self.tiles)
            self.stats.detector_runs += 1
            self.stats.detector_views += 1 + self.tiles
            self.manager.assign_detections(first, found.body_rois(), found.score)
        tracks = self.manager.followed()
        requests = [(track, pos) for track in tracks for pos in range(len(self.batch))]
        rois = Rois.concatenate([t.predict(int(self.batch.index[p])) for t, p in requests])
        results = self._landmarks(requests, rois)
        results, rois = self._recrop(requests, rois, results)
        observations = self._observations(requests, results)
        return self.manager.commit(observations, int(self.batch.index[-1]))

    def _landmarks(self, requests: list[tuple[Track, int]], rois: Rois) -> LandmarkResult | None:
        """One crop per request, all frames together, through the model in bounded chunks."""
        if not requests:
            return None
        self.stats.landmark_crops += len(requests)
        crops = []
        positions = np.array([p for _, p in requests])
        order = np.argsort(positions, kind="stable")  # group by frame: convert each frame once
        for pos in np.unique(positions):
            idx = order[positions[order] == pos]
            crops.append((idx, self.tracker.landmarks.preprocess(self.frames.get(int(pos)), rois[idx])))
        self.frames.release()
        index = np.concatenate([i for i, _ in crops])
        restore = torch.from_numpy(np.argsort(index)).to(self.tracker.device)
        batch = torch.cat([c for _, c in crops])[restore]  # back to request order
        step = self.config.max_crops_per_call
        parts = []
        for i in range(0, len(batch), step):
            self._check_cancel()
            parts.append(self.tracker.landmarks.run(batch[i:i + step], rois[i:i + step]))
        return _concat_results(parts)

    def _check_cancel(self) -> None:
        # A batch can take a second or more on a busy CPU; look between model calls too.
        if self.cancel.is_set():
            raise TrackingCancelled("tracking cancelled")

    def _recrop(
        self, requests: list[tuple[Track, int]], rois: Rois, results: LandmarkResult | None,
    ) -> tuple[LandmarkResult | None, Rois]:
        """Second look where the predicted region was poor.

        - found, but the frame's own alignment points put the person off the region's centre,
          size or angle: crop again from the frame's own region;
        - not found, but found in the previous frame: crop again from that frame's region, which
          is exactly MediaPipe's frame-to-frame rule (the prediction overshot, e.g. a sudden stop).
        """
        if results is None:
            return results, rois
        own = results.next_rois()
        present = results.present
        off = present & self._off_target(rois, own)
        source = np.where(off, np.arange(len(requests)), -1)
        for i in np.nonzero(~present)[0]:
            previous = i - 1  # requests are ordered by track, then frame
            if previous >= 0 and requests[previous][0] is requests[i][0] and present[previous]:
                source[i] = previous
        redo = np.nonzero(source >= 0)[0]
        if len(redo) == 0:
            return results, rois
        self.stats.recrops += len(redo)
        second_rois = own[source[redo]]
        second = self._landmarks([requests[i] for i in redo], second_rois)
        assert second is not None
        better = second.present  # keep the first look when the second finds nobody
        chosen = redo[better]
        merged = _replace_results(results, chosen, second, np.nonzero(better)[0])
        new_rois = Rois(rois.center.copy(), rois.size.copy(), rois.rotation.copy())
        taken = second_rois[np.nonzero(better)[0]]
        new_rois.center[chosen], new_rois.size[chosen], new_rois.rotation[chosen] = (
            taken.center, taken.size, taken.rotation)
        return merged, new_rois

    def _off_target(self, used: Rois, own: Rois) -> np.ndarray:
        shift = np.linalg.norm(own.center - used.center, axis=1) / used.size
        scale = np.abs(own.size / used.size - 1.0)
        turn = np.abs((own.rotation - used.rotation + np.pi) % (2 * np.pi) - np.pi)
        return (shift > self.config.recrop_shift) | (scale > self.config.recrop_scale) | (
            turn > math.radians(self.config.recrop_rotation_deg))

    def _observations(
        self, requests: list[tuple[Track, int]], results: LandmarkResult | None,
    ) -> dict[int, list[Observation]]:
        if results is None:
            return {}
        boxes = results.bounding_boxes()
        own = results.next_rois()
        kept = self._without_duplicates(requests, results)
        observations: dict[int, list[Observation]] = {}
        for i in kept:
            track, pos = requests[i]
            observations.setdefault(track.key, []).append(Observation(
                frame_index=int(self.batch.index[pos]),
                timestamp_s=float(self.batch.timestamp_s[pos]),
                image=results.image[i], world=results.world[i], bbox=boxes[i],
                score=float(results.score[i]), next_roi=own[[i]],
            ))
        return observations

    def _without_duplicates(self, requests: list[tuple[Track, int]], results: LandmarkResult) -> list[int]:
        """Present results, minus the younger of two tracks that landed on the same person."""
        limit = self.config.tracking.duplicate_distance
        kept: list[int] = []
        by_frame: dict[int, list[int]] = {}
        for i in np.nonzero(results.present)[0]:
            by_frame.setdefault(requests[i][1], []).append(int(i))
        for candidates in by_frame.values():
            # confirmed before tentative, then older (smaller key) first
            candidates.sort(key=lambda i: (requests[i][0].track_id is None, requests[i][0].key))
            chosen: list[int] = []
            for i in candidates:
                if all(pose_distance(results.image[i], results.image[j]) >= limit for j in chosen):
                    chosen.append(i)
            kept.extend(chosen)
        return sorted(kept, key=lambda i: (requests[i][0].key, requests[i][1]))


class _FrameStore:
    """A batch's uint8 frames as device tensors (a view on the CPU, one upload per frame on CUDA)."""

    def __init__(self, rgb: list[np.ndarray], device: torch.device) -> None:
        self.rgb = rgb
        self.device = device
        self._pos: int | None = None
        self._frame: torch.Tensor | None = None

    def get(self, pos: int) -> torch.Tensor:
        """(H, W, 3) uint8; only the latest frame is kept on the device."""
        if pos != self._pos:
            self._frame = torch.from_numpy(self.rgb[pos]).to(self.device)
            self._pos = pos
        assert self._frame is not None
        return self._frame

    def release(self) -> None:
        self._pos, self._frame = None, None


class _Decoder:
    """Decodes in a background thread, at most `prefetch_batches` batches ahead.

    Items: the VideoInfo, then FrameBatch per batch, then None. A decoding error is re-raised
    in the consumer. `stop()` ends the thread on every exit path (spool directory removed with it).
    `undecodable_frames` is final once None has been returned.
    """

    _END = object()

    def __init__(self, source: VideoSource, config: TrackerConfig, spool_dir: Path | str | None) -> None:
        self.source = source
        self.config = config
        self.spool_dir = spool_dir
        self.queue: queue.Queue[object] = queue.Queue(maxsize=config.prefetch_batches)
        self.stopping = threading.Event()
        self.undecodable_frames = 0  # written by the thread before it queues the end
        self.thread = threading.Thread(target=self._work, name="tracker-decode", daemon=True)
        self.thread.start()

    def next_item(self, cancel: threading.Event) -> VideoInfo | FrameBatch | None:
        while True:
            if cancel.is_set():
                raise TrackingCancelled("tracking cancelled")
            try:
                item = self.queue.get(timeout=_CANCEL_POLL_S)
            except queue.Empty:
                continue
            if item is self._END:
                return None
            if isinstance(item, BaseException):
                raise item
            return item  # type: ignore[return-value]

    def stop(self) -> None:
        self.stopping.set()
        if isinstance(self.source, ByteFeed):
            # Wake a decoder blocked on bytes that will never come; a no-op if the feed ended.
            self.source.abort(TrackingCancelled("tracking stopped"))
        while self.thread.is_alive():
            self._drain()
            self.thread.join(timeout=_CANCEL_POLL_S)
        self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass

    def _work(self) -> None:
        try:
            with open_video(self.source, spool_dir=self.spool_dir, decode_threads=self.config.decode_threads) as reader:
                if not self._put(reader.info):
                    return
                for batch in reader.batches(self.config.batch_size, brighten_dark=self.config.brighten_dark):
                    if not self._put(batch):
                        return
                self.undecodable_frames = reader.undecodable_frames
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            if not self.stopping.is_set():
                self._put(exc)

    def _put(self, item: object) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=_CANCEL_POLL_S)
                return True
            except queue.Full:
                continue
        return False


def _concat_results(parts: list[LandmarkResult]) -> LandmarkResult:
    if len(parts) == 1:
        return parts[0]
    return LandmarkResult(
        image=np.concatenate([p.image for p in parts]),
        world=np.concatenate([p.world for p in parts]),
        alignment=np.concatenate([p.alignment for p in parts]),
        score=np.concatenate([p.score for p in parts]),
    )


def _replace_results(base: LandmarkResult, at: np.ndarray, other: LandmarkResult, take: np.ndarray) -> LandmarkResult:
    merged = LandmarkResult(base.image.copy(), base.world.copy(), base.alignment.copy(), base.score.copy())
    merged.image[at], merged.world[at] = other.image[take], other.world[take]
    merged.alignment[at], merged.score[at] = other.alignment[take], other.score[take]
    return merged
