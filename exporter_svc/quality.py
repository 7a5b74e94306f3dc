"""Quality figures per person: what TrackQuality reports (common.proto) plus the exporter's own
SolveQuality (exporter.proto), and the JSON quality report file.

- frames_solved_fraction: share of the animation's frames with a tracked pose within half a frame
  period (the rest were interpolated across gaps; `timeline.py`).
- foot_skate_mm: horizontal travel of heel and toe tip points between consecutive frames in which
  that point is in ground contact, summed, in the exported animation's path space (for IN_PLACE
  exports the figure is taken before the horizontal path is removed, since an in-place walk slides
  its feet by design); foot_skate_unlocked_mm is the same before locking.
- foot_contact_fraction: frames in which any of the four points is in contact.
- joints: per landmark, coverage (visibility ≥ 0.5) and mean visibility over the tracked frames.
- joint_jitter_mm: mean |second difference| of the exported joints' positions, mm/frame².
- fit error: distance between the solved skeleton's joints (forward kinematics) and the
  landmark-derived positions it was solved towards (`solve.solve_errors`).
The smoothing figures of TrackQuality (jitter before/after, displacement) are left at 0: the
gateway merges them from the smoother.
"""

from __future__ import annotations

import numpy as np

from exporter_svc.solve import VISIBLE, SolvedTake, solve_errors
from exporter_svc.timeline import ResampledTrack
from mocap.v1 import common_pb2, exporter_pb2
from mocap_common.poses import LANDMARK_NAMES, PoseTrack


def joint_quality(track: PoseTrack) -> list[common_pb2.JointQuality]:
    visibility = track.image[..., 3].astype(np.float64)
    if len(track) == 0:
        return [common_pb2.JointQuality(name=n) for n in LANDMARK_NAMES]
    coverage = (visibility >= VISIBLE).mean(axis=0)
    confidence = visibility.mean(axis=0)
    return [common_pb2.JointQuality(name=name, coverage=float(c), mean_confidence=float(m))
            for name, c, m in zip(LANDMARK_NAMES, coverage, np.clip(confidence, 0.0, 1.0))]


def track_quality(track: PoseTrack, resampled: ResampledTrack | None, take: SolvedTake | None) -> common_pb2.TrackQuality:
    quality = common_pb2.TrackQuality(track_id=track.track_id, frames_tracked=len(track),
                                      joints=joint_quality(track))
    if resampled is not None and take is not None:
        quality.frames_solved_fraction = float(resampled.observed.mean())
        quality.foot_skate_mm = take.skate_m * 1000.0
        quality.foot_contact_fraction = take.contacts.foot_contact_fraction()
    return quality


def solve_quality(track_id: int, take: SolvedTake | None, note: str = "") -> exporter_pb2.SolveQuality:
    if take is None:
        return exporter_pb2.SolveQuality(track_id=track_id, exported=False, note=note)
    errors = np.concatenate([e for e in solve_errors(take).values()])
    pose = take.pose()
    jitter = 0.0
    if take.motion.frame_count >= 3:
        jitter = float(np.linalg.norm(np.diff(pose.positions, n=2, axis=0), axis=-1).mean() * 1000.0)
    return exporter_pb2.SolveQuality(
        track_id=track_id,
        frames=take.motion.frame_count,
        exported=True,
        mean_fit_error_mm=float(errors.mean() * 1000.0),
        p95_fit_error_mm=float(np.percentile(errors, 95) * 1000.0),
        joint_jitter_mm=jitter,
        foot_skate_unlocked_mm=take.unlocked_skate_m * 1000.0,
        max_hip_drop_mm=(take.lock_report.max_hip_drop_m * 1000.0) if take.lock_report else 0.0,
        floor_tilt_deg=take.ground.tilt_deg,
        note=note,
    )
