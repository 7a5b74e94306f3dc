"""Pose tracks as numpy arrays: the data that flows tracker → smoother → exporter.

Conventions (BlazePose GHUM 3D, 33 landmarks):
- image landmarks: x, y in pixels of the original frame (origin top-left, y down); z on the same
  scale as x, relative to the hip centre (smaller = closer to the camera); visibility and presence
  are probabilities in [0, 1].
- world landmarks: metres, origin at the centre between the hips, axes as the image
  (x right, y down, z away from the camera).
- A track holds only the frames where the person was seen: `frame_index` is strictly increasing
  and may skip frames (occlusion); `timestamp_s` comes from the stream's pts, so variable frame
  rate video is represented exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NUM_LANDMARKS = 33
IMAGE_CHANNELS = 5  # x, y, z, visibility, presence
WORLD_CHANNELS = 3  # x, y, z

LANDMARK_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye_inner", "left_eye", "left_eye_outer",
    "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear",
    "mouth_left", "mouth_right",
    "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
    "left_pinky", "right_pinky",
    "left_index", "right_index",
    "left_thumb", "right_thumb",
    "left_hip", "right_hip",
    "left_knee", "right_knee",
    "left_ankle", "right_ankle",
    "left_heel", "right_heel",
    "left_foot_index", "right_foot_index",
)
assert len(LANDMARK_NAMES) == NUM_LANDMARKS

# Pairs drawn by the overlay renderer and used for bone statistics.
SKELETON_EDGES: tuple[tuple[int, int], ...] = (
    (11, 12), (11, 13), (13, 15), (15, 17), (15, 19), (15, 21), (17, 19),
    (12, 14), (14, 16), (16, 18), (16, 20), (16, 22), (18, 20),
    (11, 23), (12, 24), (23, 24),
    (23, 25), (25, 27), (27, 29), (29, 31), (27, 31),
    (24, 26), (26, 28), (28, 30), (30, 32), (28, 32),
    (0, 1), (1, 2), (2, 3), (3, 7), (0, 4), (4, 5), (5, 6), (6, 8), (9, 10),
)


@dataclass
class VideoInfo:
    """What the probe / decoder learnt about the input video."""

    width: int
    height: int
    fps: float  # average frame rate (frames / duration); per-frame times are in timestamp_s
    frame_count: int
    duration_s: float
    container: str = ""
    codec: str = ""


@dataclass
class PoseTrack:
    """One person followed through the video."""

    track_id: int
    frame_index: np.ndarray  # (T,) int64, strictly increasing
    timestamp_s: np.ndarray  # (T,) float64 seconds from the stream start
    image: np.ndarray  # (T, 33, 5) float32: x px, y px, z, visibility, presence
    world: np.ndarray  # (T, 33, 3) float32 metres
    bbox: np.ndarray  # (T, 4) float32: x_min, y_min, x_max, y_max in pixels
    score: np.ndarray  # (T,) float32 pose presence score in [0, 1]

    def __post_init__(self) -> None:
        t = len(self.frame_index)
        expected = {
            "timestamp_s": (t,),
            "image": (t, NUM_LANDMARKS, IMAGE_CHANNELS),
            "world": (t, NUM_LANDMARKS, WORLD_CHANNELS),
            "bbox": (t, 4),
            "score": (t,),
        }
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ValueError(f"PoseTrack.{name} has shape {actual}, expected {shape}")

    def __len__(self) -> int:
        return len(self.frame_index)

    @classmethod
    def empty(cls, track_id: int) -> "PoseTrack":
        return cls(
            track_id=track_id,
            frame_index=np.zeros((0,), np.int64),
            timestamp_s=np.zeros((0,), np.float64),
            image=np.zeros((0, NUM_LANDMARKS, IMAGE_CHANNELS), np.float32),
            world=np.zeros((0, NUM_LANDMARKS, WORLD_CHANNELS), np.float32),
            bbox=np.zeros((0, 4), np.float32),
            score=np.zeros((0,), np.float32),
        )

    @classmethod
    def concatenate(cls, parts: list["PoseTrack"]) -> "PoseTrack":
        """Joins consecutive pieces of one track (as streamed in chunks) into one."""
        if not parts:
            raise ValueError("nothing to concatenate")
        ids = {p.track_id for p in parts}
        if len(ids) != 1:
            raise ValueError(f"pieces of different tracks: {sorted(ids)}")
        return cls(
            track_id=parts[0].track_id,
            frame_index=np.concatenate([p.frame_index for p in parts]),
            timestamp_s=np.concatenate([p.timestamp_s for p in parts]),
            image=np.concatenate([p.image for p in parts]),
            world=np.concatenate([p.world for p in parts]),
            bbox=np.concatenate([p.bbox for p in parts]),
            score=np.concatenate([p.score for p in parts]),
        )


@dataclass
class PoseTrackSet:
    """Every track found in one video."""

    video: VideoInfo
    tracks: list[PoseTrack] = field(default_factory=list)
