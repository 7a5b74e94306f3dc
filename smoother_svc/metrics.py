"""Quality figures of smoothing, in millimetres, as the field reports them.

- jitter: mean |Δ²x| of the world landmarks (mm/frame²), with no ground truth;
- accel error: mean |Δ²x̂ − Δ²x| against ground truth (mm/frame²);
- MPJPE: mean landmark distance to ground truth (mm);
- displacement: mean distance the smoother moved a landmark from its input (mm);
- coverage: per landmark, the fraction of frames with visibility ≥ 0.5.

Second differences are taken over three consecutive video frames (frame_index n−1, n, n+1), and
scaled to the track's typical frame interval when the timestamps are not evenly spaced
(variable frame rate), so the unit stays "mm per frame²" at the track's frame spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mocap_common.poses import NUM_LANDMARKS
from smoother_svc.gaps import VISIBLE, typical_interval

MM = 1000.0


@dataclass(frozen=True)
class TrackMetrics:
    track_id: int
    jitter_before_mm: float
    jitter_after_mm: float
    mean_displacement_mm: float
    joint_coverage: tuple[float, ...]  # 33 values in [0, 1]
    frames_filled: int


def frame_triplets(frame_index: np.ndarray) -> np.ndarray:
    """Positions i such that frames i−1, i, i+1 are consecutive video frames."""
    if len(frame_index) < 3:
        return np.zeros(0, np.int64)
    steps = np.diff(frame_index)
    return np.flatnonzero((steps[:-1] == 1) & (steps[1:] == 1)) + 1


def second_differences(positions: np.ndarray, timestamps: np.ndarray, centres: np.ndarray, frame_dt: float) -> np.ndarray:
    """(K, J, 3) second differences at `centres`, in units of the position per frame²."""
    before = timestamps[centres] - timestamps[centres - 1]
    after = timestamps[centres + 1] - timestamps[centres]
    slope_before = (positions[centres] - positions[centres - 1]) / before[:, None, None]
    slope_after = (positions[centres + 1] - positions[centres]) / after[:, None, None]
    accel = (slope_after - slope_before) * (2.0 / (before + after))[:, None, None]
    return accel * frame_dt**2


def jitter_mm(world: np.ndarray, frame_index: np.ndarray, timestamps: np.ndarray,
              centres: np.ndarray | None = None) -> float:
    """Mean |acceleration| of (T, 33, 3) world landmarks in metres → mm/frame² (0 if too short)."""
    centres = frame_triplets(frame_index) if centres is None else centres
    if len(centres) == 0:
        return 0.0
    dt = typical_interval(frame_index, timestamps)
    accel = second_differences(np.asarray(world, np.float64), timestamps, centres, dt)
    return float(np.mean(np.linalg.norm(accel, axis=-1)) * MM)


def mean_displacement_mm(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    return float(np.mean(np.linalg.norm(np.asarray(a, np.float64) - b, axis=-1)) * MM)


def joint_coverage(visibility: np.ndarray) -> tuple[float, ...]:
    """(T, 33) visibility → fraction of frames ≥ 0.5 per landmark (zeros for an empty track)."""
    if len(visibility) == 0:
        return (0.0,) * NUM_LANDMARKS
    return tuple(float(v) for v in np.mean(visibility >= VISIBLE, axis=0))


# --- against ground truth (benchmarks and training validation; uniform 30 fps sequences) -----


def accel_error_mm(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean |Δ²ŷ − Δ²y| over frames and landmarks, (T, J, 3) metres → mm/frame²."""
    if len(predicted) < 3:
        return 0.0
    diff = np.diff(np.asarray(predicted, np.float64), 2, axis=0) - np.diff(truth, 2, axis=0)
    return float(np.mean(np.linalg.norm(diff, axis=-1)) * MM)


def mpjpe_mm(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-joint position error, (T, J, 3) metres → mm."""
    return mean_displacement_mm(predicted, truth)
