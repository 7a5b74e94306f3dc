"""The job's quality report, merged from what the three stages measured."""

from __future__ import annotations

import numpy as np

from gateway.stage_api import SmoothOutput
from mocap.v1 import common_pb2
from mocap_common.poses import LANDMARK_NAMES, PoseTrackSet


def merge_quality(raw: PoseTrackSet, smoothed: SmoothOutput, exported: list[common_pb2.TrackQuality], *,
                  frames_undecodable: int = 0) -> common_pb2.QualityReport:
    """The job's quality report: the exporter's figures per track, with the smoother's metrics
    (jitter, displacement, coverage) and the tracker's confidence merged in, and the frames the
    tracker could not decode."""
    by_id: dict[int, common_pb2.TrackQuality] = {}
    for q in exported:
        by_id[q.track_id] = common_pb2.TrackQuality()
        by_id[q.track_id].CopyFrom(q)
    raw_by_id = {t.track_id: t for t in raw.tracks}
    for track in raw.tracks:
        q = by_id.setdefault(track.track_id, common_pb2.TrackQuality(track_id=track.track_id))
        q.frames_tracked = q.frames_tracked or len(track)
    for m in smoothed.metrics:
        q = by_id.setdefault(m.track_id, common_pb2.TrackQuality(track_id=m.track_id))
        q.jitter_before_mm = m.jitter_before_mm
        q.jitter_after_mm = m.jitter_after_mm
        q.mean_displacement_mm = m.mean_displacement_mm
        if not q.joints and len(m.joint_coverage) == len(LANDMARK_NAMES):
            track = raw_by_id.get(m.track_id)
            confidence = track.image[:, :, 3].mean(axis=0) if track is not None and len(track) else np.zeros(len(LANDMARK_NAMES))
            q.joints.extend(common_pb2.JointQuality(name=name, coverage=float(cov), mean_confidence=float(conf))
                            for name, cov, conf in zip(LANDMARK_NAMES, m.joint_coverage, confidence, strict=True))
    return common_pb2.QualityReport(tracks=[by_id[k] for k in sorted(by_id)], smoothing_method=smoothed.method,
                                    frames_undecodable=frames_undecodable)
