"""Gaps in pose tracks: which missing frames to fill, where a track must be split, and which
low-confidence samples are treated as missing.

A track lists only the frames where the person was seen. Between two consecutive tracked frames:
- `missing` frames (frame_index jumps) whose total duration is at most `max_gap_s` are filled:
  frames are inserted (timestamps interpolated by frame index) and their landmarks are
  interpolated by the filter stage; filled frames carry visibility, presence and score 0;
- a longer jump, or a pause in time (no frames missing but the interval is more than
  max(max_gap_s, 2 intervals) longer than usual), splits the track into *segments*. Segments are
  filtered separately, so no filter smears motion across a long gap and nothing is invented there.

Within a segment, a landmark whose visibility is below 0.5 for a run of samples no longer than
`max_gap_s` is treated as missing (weight 0: interpolated over / not measured); in longer runs the
tracker's own guess is kept, at a low weight, rather than inventing a straight-line motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VISIBLE = 0.5  # visibility at or above which a landmark counts as seen (also for coverage)
LOW_WEIGHT = 0.1  # weight of kept low-visibility samples (Kalman measurement noise ×10 variance)
_SLACK = 0.01  # fraction of an interval tolerated on the gap limit (timestamp rounding)


@dataclass(frozen=True)
class FillLayout:
    """The frames of a track after gap filling."""

    frame_index: np.ndarray  # (N,) int64, strictly increasing
    timestamp_s: np.ndarray  # (N,) float64, strictly increasing
    source: np.ndarray  # (N,) int64: index into the input track, -1 for an inserted frame
    segments: tuple[tuple[int, int], ...]  # [start, stop) ranges of output positions

    @property
    def inserted(self) -> np.ndarray:
        return self.source < 0

    @property
    def frames_filled(self) -> int:
        return int(np.count_nonzero(self.source < 0))


def typical_interval(frame_index: np.ndarray, timestamps: np.ndarray) -> float:
    """Median time per frame: over consecutive frame pairs when there are any, else per frame step."""
    if len(frame_index) < 2:
        return 1.0 / 30.0
    steps = np.diff(frame_index).astype(np.float64)
    dts = np.diff(timestamps)
    consecutive = steps == 1
    per_frame = dts[consecutive] if consecutive.any() else dts / steps
    value = float(np.median(per_frame))
    return value if value > 0 else 1.0 / 30.0


def plan_fill(frame_index: np.ndarray, timestamps: np.ndarray, max_gap_s: float) -> FillLayout:
    """Where to insert frames and where to split, for `max_gap_s` (< 0: never fill)."""
    n = len(frame_index)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return FillLayout(empty, np.zeros(0), empty, ())
    dt = typical_interval(frame_index, timestamps)
    limit = max_gap_s + _SLACK * dt
    pause_limit = max(max_gap_s, 2.0 * dt) + _SLACK * dt
    frames: list[np.ndarray] = [frame_index[:1]]
    times: list[np.ndarray] = [timestamps[:1]]
    sources: list[np.ndarray] = [np.zeros(1, np.int64)]
    segments: list[tuple[int, int]] = []
    start, length = 0, 1
    for i in range(n - 1):
        missing = int(frame_index[i + 1] - frame_index[i] - 1)
        interval = float(timestamps[i + 1] - timestamps[i])
        hole = interval - dt  # time nobody was seen beyond one usual interval
        # The gap's length by the clock and by the frame count must both be within the limit
        # (inconsistent timestamps must not make a huge frame jump look short).
        if missing > 0 and max_gap_s >= 0 and max(hole, missing * dt) <= limit:
            k = np.arange(1, missing + 1)
            frames.append(frame_index[i] + k)
            times.append(timestamps[i] + interval * k / (missing + 1))
            sources.append(np.full(missing, -1, np.int64))
            length += missing
        elif missing > 0 or hole > pause_limit:
            segments.append((start, length))
            start = length
        frames.append(frame_index[i + 1:i + 2])
        times.append(timestamps[i + 1:i + 2])
        sources.append(np.array([i + 1], np.int64))
        length += 1
    segments.append((start, length))
    return FillLayout(
        frame_index=np.concatenate(frames).astype(np.int64),
        timestamp_s=np.concatenate(times).astype(np.float64),
        source=np.concatenate(sources),
        segments=tuple(segments),
    )


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D boolean array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def sample_weights(visibility: np.ndarray, inserted: np.ndarray, times: np.ndarray, max_gap_s: float) -> np.ndarray:
    """Per-sample, per-landmark weights in [0, 1] for one segment.

    `visibility` (n, J) (ignored where `inserted`), `inserted` (n,). Weight 0 = missing: inserted
    frames, and low-visibility runs no longer than `max_gap_s`. Seen samples weigh their
    visibility (at least `LOW_WEIGHT`). A landmark never seen in the segment keeps every tracked
    sample at weight 1: the tracker's guess is all there is.
    """
    n, joints = visibility.shape
    vis = np.clip(np.nan_to_num(visibility, nan=0.0), 0.0, 1.0)
    weights = np.where(inserted[:, None], 0.0, np.maximum(vis, LOW_WEIGHT))
    seen = (vis >= VISIBLE) & ~inserted[:, None]
    dt = typical_interval(np.arange(n), times) if n > 1 else 1.0 / 30.0
    for j in range(joints):
        if not seen[:, j].any():
            weights[:, j] = np.where(inserted, 0.0, 1.0)
            continue
        if max_gap_s < 0:
            continue
        for a, b in true_runs(~seen[:, j]):
            before = times[a - 1] if a > 0 else times[a] - dt
            after = times[b] if b < n else times[b - 1] + dt
            if after - before - dt <= max_gap_s + _SLACK * dt:
                weights[a:b, j] = 0.0
    return weights


def interpolate_missing(times: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`values` (n, C) with every weight-0 sample replaced by linear interpolation in time between
    the nearest weighted samples of its column (holding the nearest one at the ends)."""
    out = np.array(values, np.float64, copy=True)
    for c in range(values.shape[1]):
        have = weights[:, c] > 0
        if have.all() or not have.any():
            continue
        out[~have, c] = np.interp(times[~have], times[have], out[have, c])
    return out
