"""Multi-person track bookkeeping: which regions to follow, which detections start or revive a
track, and which observations become stable-id PoseTrack pieces. Pure numpy; no models here.

Life of a track:
- born from a detection that matches no followed track (at most `max_persons` followed at once);
- followed frame to frame through the landmark model's own alignment points (MediaPipe's tracking),
  its region predicted ahead with a damped constant-velocity model across a batch;
- tentative until seen in `min_hits` frames (then it gets the next public id and its held
  observations are released), so one-frame false detections never surface;
- lost when the landmark model no longer finds the person at the end of a batch; a detection near
  where it was, within `max_gap` frames, revives it under the same id (occlusion, re-entry);
- forgotten after `max_gap` frames unseen.

Association uses a Hungarian assignment (scipy `linear_sum_assignment`) on the distance between the
detection's mid-hip point and the track's predicted region centre, in units of the region size,
plus the log size ratio; pairs above the gate never match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from mocap_common.poses import PoseTrack
from tracker_svc.roi import Rois, normalize_radians


@dataclass(frozen=True)
class TrackingConfig:
    max_persons: int = 6  # tracks followed at once
    detect_every: int = 16  # frames between detector runs looking for newcomers (when below max)
    max_gap: int = 30  # frames a lost track stays revivable under its id
    min_hits: int = 3  # frames seen before a track is confirmed and emitted
    match_gate: float = 0.6  # max association cost (centre distance / size + |log size ratio|)
    revive_gate: float = 1.0  # the same for reviving a lost track (it may have moved meanwhile)
    duplicate_distance: float = 0.08  # mean landmark distance / pose size below which two poses are one
    velocity_damping: float = 0.7  # weight of the last observed motion in the region prediction


@dataclass
class Observation:
    """One track's landmarks in one frame."""

    frame_index: int
    timestamp_s: float
    image: np.ndarray  # (33, 5)
    world: np.ndarray  # (33, 3)
    bbox: np.ndarray  # (4,)
    score: float
    next_roi: Rois  # one region, from this frame's alignment points


@dataclass
class Track:
    key: int  # internal, assigned at birth
    roi: Rois  # one region: where the person was at `last_frame` (alignment points)
    last_frame: int
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # per frame: cx, cy, size, rotation
    track_id: int | None = None  # public id, assigned at confirmation
    hits: int = 0
    lost: bool = False
    held: list[Observation] = field(default_factory=list)  # observations before confirmation

    def predict(self, frame_index: int) -> Rois:
        """The region expected at `frame_index` (constant velocity from the last observation)."""
        steps = frame_index - self.last_frame
        dcx, dcy, dsize, drot = self.velocity * steps
        size = max(self.roi.size[0] + dsize, 0.5 * self.roi.size[0])
        return Rois(
            self.roi.center + np.array([[dcx, dcy]]),
            np.array([size]),
            normalize_radians(self.roi.rotation + drot),
        )


class TrackManager:
    """Owns the tracks of one video; the pipeline asks it what to crop and tells it what it saw."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self._tracks: list[Track] = []
        self._next_key = 0
        self._next_id = 1  # public ids start at 1 (the API reserves 0 for 'every person')
        self._last_detection_frame: int | None = None

    @property
    def confirmed_count(self) -> int:
        """Public ids handed out so far."""
        return self._next_id - 1

    # -- what to look at ------------------------------------------------------------------
    def followed(self) -> list[Track]:
        return [t for t in self._tracks if not t.lost]

    def needs_detection(self, frame_index: int) -> bool:
        """Detect when nobody is followed, someone was lost, or periodically to find newcomers."""
        followed = self.followed()
        if not followed:
            return True
        if len(followed) >= self.config.max_persons:
            return False
        if any(t.lost for t in self._tracks):
            return True
        last = self._last_detection_frame
        return last is None or frame_index - last >= self.config.detect_every

    def assign_detections(self, frame_index: int, rois: Rois, scores: np.ndarray) -> list[Track]:
        """Starts or revives tracks from detections that match no followed track.

        Returns the tracks to follow from `frame_index` on that were not followed before (new or
        revived), their region set to the detection's.
        """
        self._last_detection_frame = frame_index
        order = np.argsort(-scores, kind="stable")
        rois = rois[order]
        unmatched = self._unmatched(rois, self.followed(), frame_index, self.config.match_gate)
        started: list[Track] = []
        revived = self._revive(rois[unmatched])
        for det, track in revived.items():
            started.append(self._restart(track, rois[unmatched][[det]], frame_index))
        for det in range(len(unmatched)):
            if det in revived or len(self.followed()) >= self.config.max_persons:
                continue
            track = Track(key=self._next_key, roi=rois[unmatched][[det]], last_frame=frame_index)
            self._next_key += 1
            self._tracks.append(track)
            started.append(track)
        return started

    def _unmatched(self, rois: Rois, tracks: list[Track], frame_index: int, gate: float) -> list[int]:
        if not tracks or not len(rois):
            return list(range(len(rois)))
        predicted = Rois.concatenate([t.predict(frame_index) for t in tracks])
        cost = association_cost(rois, predicted)
        rows, cols = linear_sum_assignment(cost)
        matched = {r for r, c in zip(rows, cols) if cost[r, c] <= gate}
        return [i for i in range(len(rois)) if i not in matched]

    def _revive(self, rois: Rois) -> dict[int, Track]:
        lost = [t for t in self._tracks if t.lost and t.track_id is not None]
        if not lost or not len(rois):
            return {}
        room = self.config.max_persons - len(self.followed())
        cost = association_cost(rois, Rois.concatenate([t.roi for t in lost]))
        rows, cols = linear_sum_assignment(cost)
        pairs = sorted((cost[r, c], r, c) for r, c in zip(rows, cols) if cost[r, c] <= self.config.revive_gate)
        return {r: lost[c] for _, r, c in pairs[:max(room, 0)]}

    @staticmethod
    def _restart(track: Track, roi: Rois, frame_index: int) -> Track:
        track.lost = False
        track.roi = roi
        track.last_frame = frame_index
        track.velocity = np.zeros(4)
        return track

    # -- what was seen --------------------------------------------------------------------
    def commit(self, observations: dict[int, list[Observation]], batch_end: int) -> list[PoseTrack]:
        """Records a batch's observations (per track key, in frame order) up to frame `batch_end`.

        Returns the pieces to emit: for each confirmed track, the frames seen since the last emit.
        """
        pieces: list[PoseTrack] = []
        for track in self.followed():
            seen = observations.get(track.key, [])
            if seen:
                self._advance(track, seen)
            # MediaPipe goes back to the detector once the pose flag drops; so do we, per batch.
            track.lost = not seen or seen[-1].frame_index != batch_end
            piece = self._release(track, seen)
            if piece is not None:
                pieces.append(piece)
        self._forget(batch_end)
        return pieces

    def _advance(self, track: Track, seen: list[Observation]) -> None:
        last = seen[-1]
        if len(seen) == 1:  # motion since the previous batch
            first_roi, first_frame = track.roi, track.last_frame
        else:  # motion within this batch
            first_roi, first_frame = seen[0].next_roi, seen[0].frame_index
        span = last.frame_index - first_frame
        if span > 0:
            motion = _roi_vector(last.next_roi) - _roi_vector(first_roi)
            motion[3] = normalize_radians(np.array([motion[3]]))[0]
            damping = self.config.velocity_damping
            track.velocity = damping * motion / span + (1 - damping) * track.velocity
        track.roi = last.next_roi
        track.last_frame = last.frame_index
        track.hits += len(seen)

    def _release(self, track: Track, seen: list[Observation]) -> PoseTrack | None:
        if track.track_id is None:
            track.held.extend(seen)
            if track.hits < self.config.min_hits:
                return None
            track.track_id = self._next_id
            self._next_id += 1
            seen, track.held = track.held, []
        return observations_to_track(track.track_id, seen) if seen else None

    def _forget(self, frame_index: int) -> None:
        def keep(t: Track) -> bool:
            if not t.lost:
                return True
            # tentative tracks are dropped at once when lost: they never reached min_hits
            return t.track_id is not None and frame_index - t.last_frame <= self.config.max_gap

        self._tracks = [t for t in self._tracks if keep(t)]


def association_cost(a: Rois, b: Rois) -> np.ndarray:
    """(len(a), len(b)) cost: centre distance over the mean size, plus |log size ratio|."""
    distance = np.linalg.norm(a.center[:, None, :] - b.center[None, :, :], axis=-1)
    mean_size = 0.5 * (a.size[:, None] + b.size[None, :])
    ratio = np.abs(np.log(np.maximum(a.size[:, None], 1e-6) / np.maximum(b.size[None, :], 1e-6)))
    return distance / np.maximum(mean_size, 1e-6) + ratio


def pose_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance between two poses' 33 image points over the larger pose's size (bbox diagonal)."""
    size = max(_diagonal(a), _diagonal(b), 1e-6)
    return float(np.linalg.norm(a[:, :2] - b[:, :2], axis=-1).mean() / size)


def _diagonal(points: np.ndarray) -> float:
    extent = points[:, :2].max(axis=0) - points[:, :2].min(axis=0)
    return float(np.hypot(*extent))


def _roi_vector(roi: Rois) -> np.ndarray:
    return np.array([roi.center[0, 0], roi.center[0, 1], roi.size[0], roi.rotation[0]])


def observations_to_track(track_id: int, seen: list[Observation]) -> PoseTrack:
    return PoseTrack(
        track_id=track_id,
        frame_index=np.array([o.frame_index for o in seen], np.int64),
        timestamp_s=np.array([o.timestamp_s for o in seen], np.float64),
        image=np.stack([o.image for o in seen]).astype(np.float32),
        world=np.stack([o.world for o in seen]).astype(np.float32),
        bbox=np.stack([o.bbox for o in seen]).astype(np.float32),
        score=np.array([o.score for o in seen], np.float32),
    )
