"""A small BVH reader with forward kinematics, and the mapping of the CMU skeleton to BlazePose's
33 landmarks.

Used as ground truth: the smoother trains and is measured on clean CMU motion mapped to
landmarks, the exporter round-trips CMU clips through its solver and BVH writer.

BVH semantics: each joint's local rotation is the product of its rotation channels *in the listed
order* (`Zrotation Xrotation Yrotation` → Rz · Rx · Ry), angles in degrees; a joint's position is
its parent's position plus the parent's global rotation applied to the joint's OFFSET.
"""

from __future__ import annotations

import lzma
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mocap_common.poses import NUM_LANDMARKS


@dataclass
class BvhJoint:
    name: str
    parent: int  # index into BvhClip.joints, -1 for the root
    offset: np.ndarray  # (3,) from the parent, in the file's units
    channels: tuple[str, ...]  # e.g. ("Xposition", ..., "Zrotation")
    end_site: np.ndarray | None = None  # (3,) offset of the End Site child, if any


@dataclass
class BvhClip:
    joints: list[BvhJoint]
    frame_time: float  # seconds per frame
    motion: np.ndarray  # (F, total channels) float64

    @property
    def fps(self) -> float:
        return 1.0 / self.frame_time

    @property
    def frame_count(self) -> int:
        return self.motion.shape[0]

    def index(self, name: str) -> int:
        for i, joint in enumerate(self.joints):
            if joint.name == name:
                return i
        raise KeyError(name)


@dataclass
class Pose:
    """Forward kinematics of a clip."""

    positions: np.ndarray  # (F, J, 3) joint positions
    rotations: np.ndarray  # (F, J, 3, 3) joint global rotations
    end_sites: dict[int, np.ndarray]  # joint index → (F, 3) End Site position


def find_bvh(directory: Path, name: str) -> Path:
    """`name`.bvh in `directory`, or the xz-compressed `name`.bvh.xz (as the smoother ships them)."""
    plain = directory / f"{name}.bvh"
    compressed = plain.with_name(plain.name + ".xz")
    return compressed if compressed.exists() and not plain.exists() else plain


def read_bvh(path: str | Path) -> BvhClip:
    """Parses a BVH file (hierarchy and motion); a name ending in `.xz` is read through lzma."""
    path = Path(path)
    text = lzma.decompress(path.read_bytes()).decode() if path.suffix == ".xz" else path.read_text()
    tokens = re.findall(r"[^\s{}]+|[{}]", text)
    pos = 0

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expect(word: str) -> None:
        got = take()
        if got != word:
            raise ValueError(f"BVH: expected {word!r}, got {got!r}")

    joints: list[BvhJoint] = []

    def parse_joint(parent: int) -> None:
        name = take()
        expect("{")
        expect("OFFSET")
        offset = np.array([float(take()) for _ in range(3)])
        expect("CHANNELS")
        channels = tuple(take() for _ in range(int(take())))
        index = len(joints)
        joints.append(BvhJoint(name, parent, offset, channels))
        while True:
            word = take()
            if word == "}":
                return
            if word == "JOINT":
                parse_joint(index)
            elif word == "End":
                expect("Site")
                expect("{")
                expect("OFFSET")
                joints[index].end_site = np.array([float(take()) for _ in range(3)])
                expect("}")
            else:
                raise ValueError(f"BVH: unexpected {word!r} in joint {name}")

    expect("HIERARCHY")
    expect("ROOT")
    parse_joint(-1)
    expect("MOTION")
    expect("Frames:")
    frames = int(take())
    expect("Frame")
    expect("Time:")
    frame_time = float(take())
    width = sum(len(j.channels) for j in joints)
    values = np.array(tokens[pos:pos + frames * width], dtype=np.float64)
    if values.size != frames * width:
        raise ValueError(f"BVH: expected {frames} frames of {width} channels, got {values.size} values")
    return BvhClip(joints=joints, frame_time=frame_time, motion=values.reshape(frames, width))


def axis_rotations(axis: str, degrees: np.ndarray) -> np.ndarray:
    """(F,) angles → (F, 3, 3) rotations about one axis."""
    r = np.radians(degrees)
    c, s = np.cos(r), np.sin(r)
    one, zero = np.ones_like(r), np.zeros_like(r)
    if axis == "X":
        rows = [[one, zero, zero], [zero, c, -s], [zero, s, c]]
    elif axis == "Y":
        rows = [[c, zero, s], [zero, one, zero], [-s, zero, c]]
    else:
        rows = [[c, -s, zero], [s, c, zero], [zero, zero, one]]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def forward_kinematics(clip: BvhClip) -> Pose:
    frames, count = clip.frame_count, len(clip.joints)
    positions = np.zeros((frames, count, 3))
    rotations = np.zeros((frames, count, 3, 3))
    end_sites: dict[int, np.ndarray] = {}
    column = 0
    for j, joint in enumerate(clip.joints):
        local = np.broadcast_to(np.eye(3), (frames, 3, 3)).copy()
        translation = np.zeros((frames, 3))
        for name in joint.channels:
            values = clip.motion[:, column]
            column += 1
            axis, kind = name[0].upper(), name[1:].lower()
            if kind == "position":
                translation[:, "XYZ".index(axis)] = values
            else:
                local = local @ axis_rotations(axis, values)
        if joint.parent < 0:
            positions[:, j] = joint.offset + translation
            rotations[:, j] = local
        else:
            parent_rot = rotations[:, joint.parent]
            positions[:, j] = positions[:, joint.parent] + parent_rot @ joint.offset
            rotations[:, j] = parent_rot @ local
        if joint.end_site is not None:
            end_sites[j] = positions[:, j] + rotations[:, j] @ joint.end_site
    return Pose(positions=positions, rotations=rotations, end_sites=end_sites)


# --- CMU (subject 131 skeleton, Y up, metres, facing +Z) → BlazePose 33 landmarks -------------

# BlazePose world axes are the camera's: x right, y down, z away from the camera. A camera in
# front of the performer (at +Z looking towards -Z) sees the performer's left (+X) on its right.
_CMU_TO_CAMERA = np.diag([1.0, -1.0, -1.0])


def cmu_landmarks(clip: BvhClip) -> np.ndarray:
    """Global landmark positions (F, 33, 3) in metres, camera axes, root motion kept.

    Points the CMU skeleton lacks (face, heels, fingertips) are placed rigidly on the head, foot and
    hand frames, so they move exactly with the bones they belong to.
    """
    pose = forward_kinematics(clip)
    p, rot = pose.positions, pose.rotations
    j = clip.index
    out = np.zeros((clip.frame_count, NUM_LANDMARKS, 3))
    pairs = {
        11: "LeftShoulder", 12: "RightShoulder", 13: "LeftElbow", 14: "RightElbow",
        15: "LeftWrist", 16: "RightWrist", 23: "LeftHip", 24: "RightHip",
        25: "LeftKnee", 26: "RightKnee", 27: "LeftAnkle", 28: "RightAnkle",
    }
    for landmark, joint in pairs.items():
        out[:, landmark] = p[:, j(joint)]
    for side, (heel, toe_tip) in {"Left": (29, 31), "Right": (30, 32)}.items():
        ankle, toe = p[:, j(f"{side}Ankle")], p[:, j(f"{side}Toe")]
        out[:, toe_tip] = pose.end_sites[j(f"{side}Toe")]
        knee = p[:, j(f"{side}Knee")]
        shin = _unit(ankle - knee)
        out[:, heel] = ankle + 0.06 * shin - 0.35 * (toe - ankle)
    for side, (pinky, index, thumb) in {"L": (17, 19, 21), "R": (18, 20, 22)}.items():
        fingers = j(f"{side}Fingers")
        tip = pose.end_sites[fingers]
        base = p[:, fingers]
        thumb_tip = pose.end_sites[j(f"{side}Thumb")]
        across = thumb_tip - base
        along = _unit(tip - base)
        across = _unit(across - np.sum(across * along, axis=-1, keepdims=True) * along)
        out[:, thumb] = thumb_tip
        out[:, index] = tip + 0.02 * across
        out[:, pinky] = tip - 0.03 * across
    _place_face(out, p[:, j("Head")], rot[:, j("Head")])
    return out @ _CMU_TO_CAMERA.T


def _place_face(out: np.ndarray, head: np.ndarray, head_rot: np.ndarray) -> None:
    # Offsets in the head's rest frame (x = performer's left, y = up, z = forward), metres.
    face = {
        0: (0.0, 0.04, 0.10),
        1: (0.015, 0.07, 0.085), 2: (0.03, 0.07, 0.08), 3: (0.045, 0.07, 0.07),
        4: (-0.015, 0.07, 0.085), 5: (-0.03, 0.07, 0.08), 6: (-0.045, 0.07, 0.07),
        7: (0.075, 0.05, 0.0), 8: (-0.075, 0.05, 0.0),
        9: (0.025, 0.0, 0.09), 10: (-0.025, 0.0, 0.09),
    }
    for landmark, offset in face.items():
        out[:, landmark] = head + head_rot @ np.asarray(offset)


def hip_centred(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks relative to the mid-hip point per frame, as BlazePose's world landmarks are."""
    return landmarks - 0.5 * (landmarks[:, 23:24] + landmarks[:, 24:25])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)
