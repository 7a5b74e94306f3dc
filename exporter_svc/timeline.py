"""Tracks on a constant-rate timeline: animation files need one pose per frame at a fixed rate,
while tracks carry the video's presentation times (variable frame rate video is exact) and skip
frames where the person was not seen.

Every track is resampled onto the grid t_k = k / fps of the video's timeline (so all people of a
take share frame numbers), from its first to its last timestamp: each landmark channel is
interpolated linearly in time between the two nearest tracked frames (gaps are bridged the same
way, whatever their length). A grid frame counts as observed when a tracked frame lies within half
a frame period of it; `frames_solved_fraction` in the quality report is the observed share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mocap_common.poses import PoseTrack

MIN_FPS, MAX_FPS = 1.0, 480.0
DEFAULT_FPS = 30.0


@dataclass
class ResampledTrack:
    track_id: int
    fps: float
    start_frame: int  # grid index of the first frame (t = start_frame / fps)
    image: np.ndarray  # (F, 33, 5)
    world: np.ndarray  # (F, 33, 3)
    bbox: np.ndarray  # (F, 4)
    observed: np.ndarray  # (F,) bool
    frames_tracked: int

    @property
    def frame_count(self) -> int:
        return self.world.shape[0]

    @property
    def times(self) -> np.ndarray:
        return (self.start_frame + np.arange(self.frame_count)) / self.fps


def animation_fps(video_fps: float, tracks: list[PoseTrack]) -> float:
    """The animation's frame rate: the video's average rate, else the tracks' median frame step."""
    if MIN_FPS <= video_fps <= MAX_FPS:
        return float(video_fps)
    steps = [np.diff(t.timestamp_s) / np.maximum(np.diff(t.frame_index), 1) for t in tracks if len(t) > 1]
    if steps:
        step = float(np.median(np.concatenate(steps)))
        if step > 0:
            return float(min(max(1.0 / step, MIN_FPS), MAX_FPS))
    return DEFAULT_FPS


def resample(track: PoseTrack, fps: float) -> ResampledTrack:
    """`track` on the grid k / fps between its first and last timestamp (see the module docstring)."""
    t = track.timestamp_s.astype(np.float64)
    first = math.ceil(t[0] * fps - 1e-6)
    last = math.floor(t[-1] * fps + 1e-6)
    if last < first:  # a single frame, or two frames closer than one period
        first = last = int(round(t[0] * fps))
    grid = np.arange(first, last + 1) / fps
    image = _interpolate(t, track.image.reshape(len(t), -1), grid).reshape(-1, *track.image.shape[1:])
    world = _interpolate(t, track.world.reshape(len(t), -1), grid).reshape(-1, *track.world.shape[1:])
    bbox = _interpolate(t, track.bbox, grid)
    observed = _nearest_gap(t, grid) <= 0.5 / fps + 1e-6
    return ResampledTrack(track_id=track.track_id, fps=fps, start_frame=first, image=image, world=world,
                          bbox=bbox, observed=observed, frames_tracked=len(track))


def _interpolate(t: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of each column of values (N, C) at `grid`, held at the ends."""
    values = values.astype(np.float64)
    if len(t) == 1:
        return np.repeat(values, len(grid), axis=0)
    right = np.clip(np.searchsorted(t, grid, side="right"), 1, len(t) - 1)
    left = right - 1
    span = t[right] - t[left]
    w = np.clip((grid - t[left]) / np.where(span > 0, span, 1.0), 0.0, 1.0)[:, None]
    return values[left] * (1.0 - w) + values[right] * w


def _nearest_gap(t: np.ndarray, grid: np.ndarray) -> np.ndarray:
    right = np.clip(np.searchsorted(t, grid), 0, len(t) - 1)
    left = np.clip(right - 1, 0, len(t) - 1)
    return np.minimum(np.abs(grid - t[left]), np.abs(grid - t[right]))
