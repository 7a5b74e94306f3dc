"""Native BVH writer (no Blender): one file per person.

- Units: centimetres (BVH_UNITS_PER_METRE), the unit MotionBuilder, Maya, Unreal and most BVH
  tools assume; Blender users import with scale 0.01.
- Axes: Y up, the performer faces +Z, their left is +X (see `skeleton.py`).
- Channels: the root has `Xposition Yposition Zposition Zrotation Xrotation Yrotation`, every
  other joint `Zrotation Xrotation Yrotation`; a joint's local rotation is Rz · Rx · Ry (the
  channels' listed order), degrees. The root's OFFSET is 0 0 0 so readers that do and readers
  that do not add the root OFFSET to its position channels agree.
- Euler angles are continuous over time: per frame the branch closest to the previous frame is
  chosen and each angle is moved by whole turns next to its previous value (no ±360° wraps).
- Frame Time: 1 / fps of the resampled timeline (`timeline.py`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from exporter_svc.rotations import euler_zxy_continuous
from exporter_svc.skeleton import Motion, Skeleton

BVH_UNITS_PER_METRE = 100.0
ROOT_CHANNELS = ("Xposition", "Yposition", "Zposition", "Zrotation", "Xrotation", "Yrotation")
JOINT_CHANNELS = ("Zrotation", "Xrotation", "Yrotation")


def bvh_text(skeleton: Skeleton, motion: Motion, fps: float) -> str:
    """The whole BVH file as text."""
    out = io.StringIO()
    out.write("HIERARCHY\n")
    _write_joint(out, skeleton, 0, 0)
    out.write("MOTION\n")
    out.write(f"Frames: {motion.frame_count}\n")
    out.write(f"Frame Time: {1.0 / fps:.9f}\n")
    _write_frames(out, motion_channels(skeleton, motion))
    return out.getvalue()


def write_bvh(path: Path, skeleton: Skeleton, motion: Motion, fps: float) -> None:
    path.write_text(bvh_text(skeleton, motion, fps), encoding="ascii")


def motion_channels(skeleton: Skeleton, motion: Motion) -> np.ndarray:
    """(F, channels) values in file order (depth-first joints, each joint's channels)."""
    order = _depth_first(skeleton)
    angles = euler_zxy_continuous(motion.local_rotations[:, order])  # (F, J, 3)
    return np.concatenate([motion.root_positions * BVH_UNITS_PER_METRE,
                           angles.reshape(motion.frame_count, -1)], axis=1)


def _depth_first(skeleton: Skeleton) -> list[int]:
    order: list[int] = []

    def visit(j: int) -> None:
        order.append(j)
        for child in skeleton.children(j):
            visit(child)

    visit(0)
    return order


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:.6f}" for v in values)


def _write_joint(out: io.StringIO, skeleton: Skeleton, j: int, depth: int) -> None:
    pad = "\t" * depth
    kind = "ROOT" if skeleton.parents[j] < 0 else "JOINT"
    channels = ROOT_CHANNELS if kind == "ROOT" else JOINT_CHANNELS
    out.write(f"{pad}{kind} {skeleton.names[j]}\n{pad}{{\n")
    out.write(f"{pad}\tOFFSET {_fmt(skeleton.offsets[j] * BVH_UNITS_PER_METRE)}\n")
    out.write(f"{pad}\tCHANNELS {len(channels)} {' '.join(channels)}\n")
    for child in skeleton.children(j):
        _write_joint(out, skeleton, child, depth + 1)
    if j in skeleton.end_sites:
        out.write(f"{pad}\tEnd Site\n{pad}\t{{\n")
        out.write(f"{pad}\t\tOFFSET {_fmt(skeleton.end_sites[j] * BVH_UNITS_PER_METRE)}\n")
        out.write(f"{pad}\t}}\n")
    out.write(f"{pad}}}\n")


def _write_frames(out: io.StringIO, values: np.ndarray) -> None:
    # np.savetxt formats a row at a time in C; a 1000-frame, 69-channel take takes ~30 ms.
    np.savetxt(out, values, fmt="%.6f", delimiter=" ")


__all__ = ["BVH_UNITS_PER_METRE", "bvh_text", "motion_channels", "write_bvh"]
