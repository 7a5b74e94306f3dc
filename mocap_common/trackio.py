"""PoseTrackSet ⇄ .npz, the tracker's debug-command output format (`python -m tracker_svc track
--out FILE.npz`), read back by the smoother's noise measurement (`python -m smoother_svc.noise
measure FILE.npz...`). Shared here because services never import each other.

One compressed numpy archive (`np.savez_compressed`), plain arrays only (loads without pickle):

    format                  "mocap-posetracks/1"
    video_width, video_height, video_frame_count        int64 scalars
    video_fps, video_duration_s                          float64 scalars
    video_container, video_codec                         str scalars
    track_ids               (K,) int64, ascending
    t{ID}_frame_index       (T,) int64        t{ID}_timestamp_s (T,) float64
    t{ID}_image             (T, 33, 5) float32 (x px, y px, z, visibility, presence)
    t{ID}_world             (T, 33, 3) float32 metres
    t{ID}_bbox              (T, 4) float32    t{ID}_score       (T,) float32

Field meanings are those of mocap_common.poses.PoseTrack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mocap_common.poses import PoseTrack, PoseTrackSet, VideoInfo

FORMAT = "mocap-posetracks/1"
_TRACK_FIELDS = ("frame_index", "timestamp_s", "image", "world", "bbox", "score")


def save_track_set(path: Path | str, track_set: PoseTrackSet) -> None:
    video = track_set.video
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "video_width": np.array(video.width, np.int64),
        "video_height": np.array(video.height, np.int64),
        "video_frame_count": np.array(video.frame_count, np.int64),
        "video_fps": np.array(video.fps, np.float64),
        "video_duration_s": np.array(video.duration_s, np.float64),
        "video_container": np.array(video.container),
        "video_codec": np.array(video.codec),
        "track_ids": np.array(sorted(t.track_id for t in track_set.tracks), np.int64),
    }
    for track in track_set.tracks:
        for name in _TRACK_FIELDS:
            arrays[f"t{track.track_id}_{name}"] = getattr(track, name)
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez_compressed(f, **arrays)


def load_track_set(path: Path | str) -> PoseTrackSet:
    with np.load(path, allow_pickle=False) as data:
        if str(data["format"]) != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        video = VideoInfo(
            width=int(data["video_width"]), height=int(data["video_height"]),
            fps=float(data["video_fps"]), frame_count=int(data["video_frame_count"]),
            duration_s=float(data["video_duration_s"]),
            container=str(data["video_container"]), codec=str(data["video_codec"]),
        )
        tracks = [
            PoseTrack(track_id=int(i), **{name: data[f"t{int(i)}_{name}"] for name in _TRACK_FIELDS})
            for i in data["track_ids"]
        ]
    return PoseTrackSet(video=video, tracks=tracks)
