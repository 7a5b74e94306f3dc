"""Clean reference motion: the CMU clips through forward kinematics, as BlazePose-style tracks.

`cmu_131_01` and `cmu_131_02` train the learned smoother; `cmu_131_03` is held out (training
reports its validation figures on it, never selects a model by it; the benchmark marks which clips
a learned model saw). Clips are 120 fps; they are sampled at 30 fps (every 4th frame, with
`phase` choosing which of the four), so ground truth is exact mocap at those instants.

Image landmarks come from a synthetic pinhole camera 4 m in front of the performer's mean
position (1920×1080, focal 1000 px), so tests and benchmarks can exercise the image path too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mocap_common.bvh import cmu_landmarks, find_bvh, hip_centred, read_bvh
from mocap_common.poses import NUM_LANDMARKS, PoseTrack, PoseTrackSet, VideoInfo
from smoother_svc.noise import NoiseModel, sample_noise

TRAIN_CLIPS = ("cmu_131_01", "cmu_131_02")
HELD_OUT_CLIPS = ("cmu_131_03",)
ALL_CLIPS = TRAIN_CLIPS + HELD_OUT_CLIPS
FRAME_WIDTH, FRAME_HEIGHT, FOCAL_PX, CAMERA_DISTANCE_M = 1920, 1080, 1000.0, 4.0


@dataclass
class ReferenceClip:
    """Ground truth of one clip at a fixed frame rate."""

    name: str
    fps: float
    world: np.ndarray  # (T, 33, 3) metres, hip-centred (BlazePose world landmarks)
    image: np.ndarray  # (T, 33, 3) pixels: x, y, z on the scale of x relative to the hips

    @property
    def frames(self) -> int:
        return len(self.world)

    @property
    def timestamps(self) -> np.ndarray:
        return np.arange(self.frames) / self.fps


def load_clip(mocap_dir: Path, name: str, fps: float = 30.0, phase: int = 0) -> ReferenceClip:
    """Clip `name` (e.g. "cmu_131_03") sampled at `fps`, starting `phase` source frames in."""
    clip = read_bvh(find_bvh(mocap_dir, name))
    landmarks = cmu_landmarks(clip)  # (F, 33, 3) camera axes, root motion kept
    source_times = np.arange(clip.frame_count) * clip.frame_time
    times = phase * clip.frame_time + np.arange(0.0, source_times[-1] - phase * clip.frame_time + 1e-9, 1.0 / fps)
    flat = landmarks.reshape(clip.frame_count, -1)
    sampled = np.stack([np.interp(times, source_times, flat[:, c]) for c in range(flat.shape[1])], axis=1)
    sampled = sampled.reshape(len(times), NUM_LANDMARKS, 3)
    return ReferenceClip(name=name, fps=fps, world=hip_centred(sampled), image=project(sampled))


def project(landmarks: np.ndarray) -> np.ndarray:
    """Global landmarks (camera axes) → image landmarks of the synthetic camera."""
    centre = landmarks[:, 23:25].mean(axis=1).mean(axis=0)  # mean hip position over the clip
    camera = centre - np.array([0.0, 0.0, CAMERA_DISTANCE_M])
    rel = landmarks - camera
    depth = np.maximum(rel[..., 2], 0.5)
    hips_depth = np.maximum(0.5 * (rel[:, 23, 2] + rel[:, 24, 2]), 0.5)[:, None]
    x = FOCAL_PX * rel[..., 0] / depth + FRAME_WIDTH / 2
    y = FOCAL_PX * rel[..., 1] / depth + FRAME_HEIGHT / 2
    z = FOCAL_PX * (rel[..., 2] - hips_depth) / hips_depth
    return np.stack([x, y, z], axis=-1)


def object_scale_px(image: np.ndarray) -> np.ndarray:
    """(T,) mean of the width and height of the landmark box, pixels."""
    xy = image[:, :, :2]
    return (xy.max(axis=1) - xy.min(axis=1)).mean(axis=1)


def noisy_track(clip: ReferenceClip, model: NoiseModel, rng: np.random.Generator, scale: float = 1.0,
                track_id: int = 1) -> PoseTrack:
    """The clip as a tracker would report it: tracker-shaped noise, visibility with dropouts."""
    noise = sample_noise(model, clip.frames, rng, scale)
    image = np.zeros((clip.frames, NUM_LANDMARKS, 5), np.float32)
    image[:, :, :3] = clip.image + noise.image_rel * object_scale_px(clip.image)[:, None, None]
    image[:, :, 3] = noise.visibility
    image[:, :, 4] = np.clip(noise.visibility + 0.05, 0.0, 1.0)
    xy = image[:, :, :2]
    return PoseTrack(
        track_id=track_id,
        frame_index=np.arange(clip.frames, dtype=np.int64),
        timestamp_s=clip.timestamps,
        image=image,
        world=(clip.world + noise.world).astype(np.float32),
        bbox=np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32),
        score=np.full(clip.frames, 0.95, np.float32),
    )


def clean_track(clip: ReferenceClip, track_id: int = 1) -> PoseTrack:
    """The clip as a perfect tracker would report it."""
    image = np.ones((clip.frames, NUM_LANDMARKS, 5), np.float32)
    image[:, :, :3] = clip.image
    xy = clip.image[:, :, :2]
    return PoseTrack(
        track_id=track_id,
        frame_index=np.arange(clip.frames, dtype=np.int64),
        timestamp_s=clip.timestamps,
        image=image,
        world=clip.world.astype(np.float32),
        bbox=np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32),
        score=np.ones(clip.frames, np.float32),
    )


def video_info(clip: ReferenceClip) -> VideoInfo:
    return VideoInfo(width=FRAME_WIDTH, height=FRAME_HEIGHT, fps=clip.fps, frame_count=clip.frames,
                     duration_s=clip.frames / clip.fps, container="synthetic", codec="none")


def track_set(clip: ReferenceClip, tracks: list[PoseTrack]) -> PoseTrackSet:
    return PoseTrackSet(video=video_info(clip), tracks=tracks)
