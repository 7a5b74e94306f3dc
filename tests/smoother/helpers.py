"""Synthetic pose tracks for the smoother's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mocap_common.poses import NUM_LANDMARKS, PoseTrack
from tests.support import MOCAP

MOCAP_DIR: Path = MOCAP


def make_track(times: np.ndarray, *, frame_index: np.ndarray | None = None, track_id: int = 1,
               world: np.ndarray | None = None, image_xyz: np.ndarray | None = None,
               visibility: float | np.ndarray = 0.9) -> PoseTrack:
    """A track at `times`; landmarks default to a fixed pose with a 1.7 m person 850 px tall."""
    n = len(times)
    base = np.linspace(-0.8, 0.9, NUM_LANDMARKS)
    if world is None:
        world = np.zeros((n, NUM_LANDMARKS, 3))
        world[:, :, 1] = base
        world[:, :, 0] = 0.2 * np.sin(np.arange(NUM_LANDMARKS))
    if image_xyz is None:
        image_xyz = world * 500.0 + np.array([960.0, 540.0, 0.0])
    image = np.zeros((n, NUM_LANDMARKS, 5), np.float32)
    image[:, :, :3] = image_xyz
    image[:, :, 3] = visibility
    image[:, :, 4] = 0.95
    xy = image[:, :, :2]
    return PoseTrack(
        track_id=track_id,
        frame_index=np.arange(n, dtype=np.int64) if frame_index is None else np.asarray(frame_index, np.int64),
        timestamp_s=np.asarray(times, np.float64),
        image=image,
        world=np.asarray(world, np.float32),
        bbox=np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32),
        score=np.full(n, 0.9, np.float32),
    )


def moving_world(times: np.ndarray, speed: float = 0.3) -> np.ndarray:
    """Every landmark moving on its own straight line (m, m/s)."""
    start = make_track(times[:1]).world[0].astype(np.float64)
    direction = np.stack([np.cos(np.arange(NUM_LANDMARKS)), np.sin(np.arange(NUM_LANDMARKS)),
                          0.3 * np.ones(NUM_LANDMARKS)], axis=1)
    return start + speed * times[:, None, None] * direction
