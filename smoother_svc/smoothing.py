"""Smoothing whole pose tracks: gap filling, segment-wise filtering of every landmark coordinate,
and the quality figures.

For each track: plan the gaps (`gaps.plan_fill`), then for each segment
1. weigh every landmark sample by its visibility (`gaps.sample_weights`: short low-visibility runs
   and inserted frames weigh 0),
2. interpolate the weight-0 samples from their neighbours (`gaps.interpolate_missing`),
3. filter world landmarks (metres) and image landmarks (x, y, z in pixels, converted to about
   metres with the track's pixels-per-metre so one set of parameters fits both) — the Kalman
   smoother instead skips weight-0 samples and trusts the others by their weight.

What is kept as the tracker gave it: visibility and presence (they are per-frame confidences that
feed weighting and coverage downstream; MediaPipe's causal alpha-0.1 low-pass would make them lag
by about ten frames and count frames as confident when the tracker was not), boxes and scores.
Inserted frames get visibility, presence and score 0, interpolated boxes, filtered landmarks.
No NaN or inf leaves this module: a channel whose filter output is not finite falls back to its
interpolated input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mocap_common.poses import NUM_LANDMARKS, PoseTrack
from smoother_svc import metrics
from smoother_svc.errors import BadTracks
from smoother_svc.filters import FilterSpec, KalmanRts, OneEuro, apply_filter
from smoother_svc.gaps import VISIBLE, FillLayout, interpolate_missing, plan_fill, sample_weights
from smoother_svc.smoothnet import LearnedSmoother

# Landmarks beyond these are not tracker output but corruption (BlazePose world coordinates stay
# within a few metres of the hips; image coordinates within a few frame sizes).
WORLD_LIMIT_M = 1.0e3
IMAGE_LIMIT_PX = 1.0e7
_MIN_EXTENT = 1e-3


@dataclass(frozen=True)
class SmoothingPlan:
    """What to do to every track.

    `world`/`image` are the classical filters (None = no filtering). With `learned` set, world
    landmarks go through the learned smoother, and `world` serves segments shorter than its window.
    `max_gap_s` < 0 never fills gaps.
    """

    label: str
    world: FilterSpec | None
    image: FilterSpec | None
    max_gap_s: float
    learned: LearnedSmoother | None = None


@dataclass
class SmoothedTrack:
    track: PoseTrack
    metrics: metrics.TrackMetrics


def check_track(track: PoseTrack, where: str) -> None:
    """Rejects what the wire codec lets through but no tracker produces."""
    if len(track) > 1 and np.any(np.diff(track.timestamp_s) <= 0):
        raise BadTracks(f"{where}.frames", "timestamp_seconds must be strictly increasing")
    if len(track) > 1 and np.any(np.diff(track.frame_index) <= 0):
        raise BadTracks(f"{where}.frames", "frame_index must be strictly increasing")
    for name, values, limit in (("world_landmarks", track.world, WORLD_LIMIT_M),
                                ("image_landmarks", track.image, IMAGE_LIMIT_PX)):
        bad = ~np.isfinite(values) | (np.abs(values) > limit)
        if bad.any():
            frame = int(np.argwhere(bad)[0][0])
            raise BadTracks(f"{where}.frames[{frame}].{name}", f"must be finite and within ±{limit:g}")


def smooth_tracks(tracks: list[PoseTrack], plan: SmoothingPlan) -> list[SmoothedTrack]:
    """Checks and smooths every track (ordered by track_id)."""
    ordered = sorted(tracks, key=lambda t: t.track_id)
    for i, track in enumerate(ordered):
        check_track(track, f"tracks[{i}]")
    return [smooth_track(track, plan) for track in ordered]


def smooth_track(track: PoseTrack, plan: SmoothingPlan) -> SmoothedTrack:
    layout = plan_fill(track.frame_index, track.timestamp_s, plan.max_gap_s)
    inserted = layout.inserted
    seen = np.flatnonzero(~inserted)
    n = len(layout.frame_index)

    image = np.zeros((n, NUM_LANDMARKS, 5), np.float64)
    world = np.zeros((n, NUM_LANDMARKS, 3), np.float64)
    image[seen] = track.image
    world[seen] = track.world

    for a, b in layout.segments:
        _smooth_segment(plan, track, layout, a, b, image, world)

    smoothed = PoseTrack(
        track_id=track.track_id,
        frame_index=layout.frame_index,
        timestamp_s=layout.timestamp_s,
        image=image.astype(np.float32),
        world=world.astype(np.float32),
        bbox=_fill_boxes(track, layout.timestamp_s, inserted),
        score=np.where(inserted, 0.0, _scatter(track.score, seen, n)).astype(np.float32),
    )
    return SmoothedTrack(smoothed, track_metrics(track, smoothed, inserted, layout.frames_filled))


def _smooth_segment(plan: SmoothingPlan, track: PoseTrack, layout: FillLayout, a: int, b: int,
                    image: np.ndarray, world: np.ndarray) -> None:
    """Filters output positions [a, b) of `image` and `world` in place."""
    times = layout.timestamp_s[a:b]
    inserted = layout.inserted[a:b]
    # Units per segment (a person far away after a long gap has other pixels per metre).
    observed = layout.source[a:b][~inserted]
    pixels_per_metre, extent_px = image_units(track.image[observed], track.world[observed])
    object_scale = np.interp(times, track.timestamp_s[observed], extent_px / pixels_per_metre)
    weights = np.repeat(sample_weights(image[a:b, :, 3], inserted, times, plan.max_gap_s), 3, axis=1)
    world_in = world[a:b].reshape(b - a, -1)
    image_in = image[a:b, :, :3].reshape(b - a, -1) / pixels_per_metre
    if _filter_together(plan):  # one pass over both: the Kalman loop runs once
        both = _filter(plan.world, times, np.hstack([world_in, image_in]), np.hstack([weights, weights]), inserted, None)
        world_out, image_out = both[:, :world_in.shape[1]], both[:, world_in.shape[1]:]
    else:
        world_out = _filter_world(plan, times, world_in, weights, inserted)
        image_out = _filter(plan.image, times, image_in, weights, inserted, object_scale)
    world[a:b] = world_out.reshape(b - a, NUM_LANDMARKS, 3)
    image[a:b, :, :3] = image_out.reshape(b - a, NUM_LANDMARKS, 3) * pixels_per_metre


def _filter_together(plan: SmoothingPlan) -> bool:
    same = plan.learned is None and plan.world == plan.image
    return same and not (isinstance(plan.world, OneEuro) and plan.world.scale_speed)


def _filter_world(plan: SmoothingPlan, times: np.ndarray, values: np.ndarray, weights: np.ndarray,
                  inserted: np.ndarray) -> np.ndarray:
    learned = plan.learned
    if learned is not None and len(times) > learned.window:
        filled = interpolate_missing(times, values, weights)
        return _finite_or(learned.apply(times, filled), filled)
    return _filter(plan.world, times, values, weights, inserted, None)


def _filter(spec: FilterSpec | None, times: np.ndarray, values: np.ndarray, weights: np.ndarray,
            inserted: np.ndarray, object_scale: np.ndarray | None) -> np.ndarray:
    filled = interpolate_missing(times, values, weights)
    if spec is None:  # no filtering: tracked samples stay exactly as they were
        return np.where(inserted[:, None], filled, values)
    if isinstance(spec, KalmanRts):
        out = apply_filter(spec, times, filled, weights=weights)
    elif isinstance(spec, OneEuro):
        out = apply_filter(spec, times, filled, object_scale=object_scale)
    else:
        out = apply_filter(spec, times, filled)
    return _finite_or(out, filled)


def _finite_or(out: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    bad_columns = ~np.all(np.isfinite(out), axis=0)
    if bad_columns.any():
        out = out.copy()
        out[:, bad_columns] = fallback[:, bad_columns]
    return out


def image_units(image: np.ndarray, world: np.ndarray) -> tuple[float, np.ndarray]:
    """(pixels per metre of this person, per-frame landmark extent in pixels) for (T, 33, 5) image
    and (T, 33, 3) world landmarks.

    The extent is MediaPipe's object scale: the mean of the width and height of the box around the
    visible landmarks. Pixels per metre is the median ratio of image to world extents.
    """
    if len(image) == 0:
        return 1.0, np.zeros(0)
    seen = image[:, :, 3] >= VISIBLE
    few = seen.sum(axis=1) < 2
    seen[few] = True  # too few visible landmarks: use them all
    image_extent = _extent(image[:, :, :2], seen)
    world_extent = _extent(world[:, :, :2], seen)
    usable = (world_extent > _MIN_EXTENT) & (image_extent > _MIN_EXTENT)
    ratio = float(np.median(image_extent[usable] / world_extent[usable])) if usable.any() else 1.0
    ratio = ratio if np.isfinite(ratio) and ratio > 0 else 1.0
    return ratio, np.maximum(image_extent, _MIN_EXTENT * ratio)


def _extent(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    big = np.finfo(np.float64).max
    lo = np.where(mask[..., None], points, big).min(axis=1)
    hi = np.where(mask[..., None], points, -big).max(axis=1)
    return np.mean(hi - lo, axis=1)


def _scatter(values: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, *values.shape[1:]), values.dtype)
    out[positions] = values
    return out


def _fill_boxes(track: PoseTrack, times: np.ndarray, inserted: np.ndarray) -> np.ndarray:
    boxes = np.empty((len(times), 4), np.float32)
    if len(track) == 0:
        return boxes
    for c in range(4):
        boxes[:, c] = np.interp(times, track.timestamp_s, track.bbox[:, c])
    boxes[~inserted] = track.bbox
    return boxes


def track_metrics(before: PoseTrack, after: PoseTrack, inserted: np.ndarray, frames_filled: int) -> metrics.TrackMetrics:
    """Figures over the tracked frames (filled frames excluded, so before and after compare)."""
    after_world = after.world[~inserted].astype(np.float64)
    centres = metrics.frame_triplets(before.frame_index)
    return metrics.TrackMetrics(
        track_id=before.track_id,
        jitter_before_mm=metrics.jitter_mm(before.world, before.frame_index, before.timestamp_s, centres),
        jitter_after_mm=metrics.jitter_mm(after_world, before.frame_index, before.timestamp_s, centres),
        mean_displacement_mm=metrics.mean_displacement_mm(after_world, before.world),
        joint_coverage=metrics.joint_coverage(before.image[:, :, 3]),
        frames_filled=frames_filled,
    )
