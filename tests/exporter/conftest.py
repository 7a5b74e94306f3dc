"""Shared helpers for the exporter tests: CMU clips as landmarks and pose tracks, Blender re-import
probes and the glTF validator (both in child processes), and the exporter as a real service."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from exporter_svc.blender_child import K as BLENDER_FROM_BODY
from exporter_svc.solve import SolvedTake, SolveOptions, TakeInput, solve_take
from mocap_common.bvh import BvhClip, cmu_landmarks, find_bvh, hip_centred, read_bvh
from mocap_common.poses import PoseTrack, VideoInfo
from tests.support import MOCAP, REPO, ServiceProcess

PROBE = Path(__file__).with_name("blender_probe.py")
VALIDATOR = Path(__file__).with_name("validate_gltf.js")
CAMERA_HFOV_DEG = 60.0
CAMERA_OFFSET = np.array([0.0, 1.0, 4.5])  # the performer's floor 1 m below the camera, 4.5 m away
# The CMU files say "Frame Time: 0.008333", a rounded 1/120 s. Tests use exactly 120 fps: Blender's
# FBX importer turns key times into frames with the scene's integer fps, ignoring fps_base, so a
# re-import at 120.0048 fps drifts by 0.004 % per frame (other FBX readers use the times).
CMU_FPS = 120.0


@functools.lru_cache(maxsize=None)
def cmu_clip(name: str = "cmu_131_01") -> BvhClip:
    return read_bvh(find_bvh(MOCAP, name))


@functools.lru_cache(maxsize=None)
def cmu_global_landmarks(name: str = "cmu_131_01") -> np.ndarray:
    """(F, 33, 3) global landmarks in camera axes (metres), root motion kept."""
    return cmu_landmarks(cmu_clip(name))


def solve_cmu(name: str = "cmu_131_01", frames: slice = slice(None), *, foot_locking: bool = False,
              in_place: bool = False, noise_m: float = 0.0, seed: int = 0) -> SolvedTake:
    """Solves a CMU clip from its global landmarks (root trajectory = the mid-hip path)."""
    landmarks = cmu_global_landmarks(name)[frames]
    if noise_m:
        landmarks = landmarks + np.random.default_rng(seed).normal(0.0, noise_m, landmarks.shape)
    root = 0.5 * (landmarks[:, 23] + landmarks[:, 24])
    take = TakeInput(world=landmarks - root[:, None], visibility=np.ones(landmarks.shape[:2]), root=root)
    return solve_take(take, SolveOptions(fps=CMU_FPS, foot_locking=foot_locking, in_place=in_place))


def project(points_cam: np.ndarray, width: int, height: int, hfov_deg: float = CAMERA_HFOV_DEG) -> np.ndarray:
    """Pinhole projection (principal point at the centre) of camera-axes points → pixels."""
    f = (width / 2) / np.tan(np.radians(hfov_deg) / 2)
    return np.stack([points_cam[..., 0] / points_cam[..., 2] * f + width / 2,
                     points_cam[..., 1] / points_cam[..., 2] * f + height / 2], axis=-1)


def cmu_track(name: str = "cmu_131_01", *, track_id: int = 1, step: int = 4, frames: int | None = None,
              start: int = 0, shift_m: tuple[float, float, float] = (0.0, 0.0, 0.0), width: int = 1920,
              height: int = 1080, fps: float = 30.0, first_frame: int = 0) -> PoseTrack:
    """A tracker-like PoseTrack from a CMU clip: every `step`-th frame (120 fps / 4 = 30 fps),
    world landmarks hip-centred, image landmarks projected by a 60° pinhole camera."""
    landmarks = cmu_global_landmarks(name)[start::step]
    if frames is not None:
        landmarks = landmarks[:frames]
    landmarks = landmarks + np.asarray(shift_m)
    n = len(landmarks)
    image = np.ones((n, 33, 5), np.float32)
    image[..., :2] = project(landmarks + CAMERA_OFFSET, width, height)
    image[..., 2] = 0.0
    xy = image[..., :2]
    bbox = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32)
    index = first_frame + np.arange(n, dtype=np.int64)
    return PoseTrack(track_id=track_id, frame_index=index, timestamp_s=index / fps, image=image,
                     world=hip_centred(landmarks).astype(np.float32), bbox=bbox, score=np.ones(n, np.float32))


def video_info(frames: int, fps: float = 30.0, width: int = 1920, height: int = 1080) -> VideoInfo:
    return VideoInfo(width=width, height=height, fps=fps, frame_count=frames, duration_s=frames / fps,
                     container="mov,mp4,m4a,3gp,3g2,mj2", codec="h264")


@dataclass
class ProbeArmature:
    names: list[str]
    heads: np.ndarray  # (F, J, 3) Blender axes, metres
    tails: np.ndarray
    turns: np.ndarray  # (F, J, 3, 3) world rotation relative to the bone's rest

    def joint(self, name: str) -> int:
        return self.names.index(name)


@dataclass
class ProbeResult:
    frames: np.ndarray
    armatures: dict[str, ProbeArmature]


def blender_probe(kind: str, path: Path, fps: float, out_dir: Path) -> ProbeResult:
    """Re-imports `path` with Blender's own importer in a child process; joint world positions."""
    out = out_dir / f"probe-{kind}-{path.stem}.npz"
    result = subprocess.run([sys.executable, str(PROBE), kind, str(path), str(out), "--fps", repr(fps)],
                            capture_output=True, text=True, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(out)
    names = sorted({key.split("/")[0] for key in data.files if "/" in key})
    return ProbeResult(frames=data["frames"], armatures={
        n: ProbeArmature(list(data[f"{n}/names"]), data[f"{n}/heads"], data[f"{n}/tails"], data[f"{n}/turns"])
        for n in names})


def to_blender(points_body: np.ndarray) -> np.ndarray:
    """BVH body axes (Y up, facing +Z) → Blender axes (Z up, facing −Y)."""
    return points_body @ BLENDER_FROM_BODY.T


def validate_gltf(path: Path) -> dict:
    result = subprocess.run(["node", str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def exporter_factory(tmp_path):
    """Starts `python -m exporter_svc` as a real child process; stops it at the end."""
    started: list[ServiceProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str = "exporter") -> ServiceProcess:
        work = tmp_path / f"{name}-work"
        service = ServiceProcess("exporter_svc", ["--work-dir", str(work), "--log-format", "console", *args],
                                 env=env, log_path=tmp_path / f"{name}.log")
        service.work_dir = work  # type: ignore[attr-defined]
        started.append(service.start())
        return service

    yield start
    for service in started:
        service.stop()
