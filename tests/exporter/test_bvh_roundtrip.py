"""CMU clip → joint positions (FK) → landmarks → solve → our BVH → read back by parsers that are
not ours (PyPI `bvh` + `bvhtoolbox`, and Blender's own importer) → joint positions within 1 mm of
the solved skeleton's forward kinematics."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import numpy as np
import pytest
from bvh import Bvh

# bvhtoolbox 0.1.3 imports `pkg_resources` only to read its own version, and setuptools ≥ 81 no
# longer ships that module: give it the one function it calls, backed by importlib.metadata.
if "pkg_resources" not in sys.modules:
    _shim = types.ModuleType("pkg_resources")
    _shim.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = _shim
from bvhtoolbox import BvhTree, get_affines  # noqa: E402

from exporter_svc.bvh_writer import BVH_UNITS_PER_METRE, write_bvh
from exporter_svc.skeleton import END_SITE_NAMES, JOINT
from tests.exporter.conftest import blender_probe, solve_cmu, to_blender

TOLERANCE_M = 0.001


def _bvhtoolbox_positions(path) -> tuple[list[str], np.ndarray]:
    """World joint positions (F, J, 3) in file units, composed from bvhtoolbox's per-joint
    transforms (its parser, its Euler convention via transforms3d) the way its bvh2csv does."""
    tree = BvhTree(path.read_text())
    names = tree.get_joints_names()
    world: dict[str, np.ndarray] = {}
    for joint in tree.get_joints():
        rotation_axes = "".join(ch[0] for ch in tree.joint_channels(joint.name) if ch.endswith("rotation")).lower()
        affines = get_affines(tree, joint.name, axes="s" + rotation_axes[::-1])
        parent = tree.joint_parent(joint.name)
        if parent is not None:
            affines[:, :3, 3] = tree.joint_offset(joint.name)
            affines = world[parent.name] @ affines
        world[joint.name] = affines
    return names, np.stack([world[n][:, :3, 3] for n in names], axis=1)


@pytest.fixture(scope="module")
def solved_take():
    # 300 frames (2.5 s) of walking keep the Blender import quick; the slow test runs whole clips.
    return solve_cmu("cmu_131_02", slice(0, 300), foot_locking=True)


def test_bvh_read_by_independent_parsers_matches_the_solved_skeleton(solved_take, tmp_path):
    path = tmp_path / "walk.bvh"
    write_bvh(path, solved_take.skeleton, solved_take.motion, solved_take.fps)
    pose = solved_take.pose()

    # PyPI `bvh`: structure, units and channel layout as written.
    parsed = Bvh(path.read_text())
    assert parsed.get_joints_names() == list(solved_take.skeleton.names)
    assert parsed.nframes == solved_take.motion.frame_count
    assert parsed.frame_time == pytest.approx(1 / solved_take.fps, rel=1e-6)
    assert parsed.joint_channels("Hips") == ["Xposition", "Yposition", "Zposition", "Zrotation", "Xrotation", "Yrotation"]
    assert parsed.joint_channels("LeftForeArm") == ["Zrotation", "Xrotation", "Yrotation"]
    np.testing.assert_allclose(parsed.joint_offset("LeftLeg"),
                               solved_take.skeleton.offsets[JOINT["LeftLeg"]] * BVH_UNITS_PER_METRE, atol=1e-5)

    # bvhtoolbox: forward kinematics of the file → every joint within 1 mm, every frame.
    names, positions = _bvhtoolbox_positions(path)
    order = [names.index(n) for n in solved_take.skeleton.names]
    error = np.linalg.norm(positions[:, order] / BVH_UNITS_PER_METRE - pose.positions, axis=-1)
    print(f"BVH via bvhtoolbox: max {error.max() * 1000:.5f} mm over {error.size} joint-frames")
    assert error.max() < TOLERANCE_M


def test_bvh_imported_by_blender_matches_the_solved_skeleton(solved_take, tmp_path):
    path = tmp_path / "walk.bvh"
    write_bvh(path, solved_take.skeleton, solved_take.motion, solved_take.fps)
    probe = blender_probe("bvh", path, solved_take.fps, tmp_path)
    (armature,) = probe.armatures.values()
    pose = solved_take.pose()
    frames = probe.frames[(probe.frames >= 0) & (probe.frames < solved_take.motion.frame_count)]
    assert len(frames) == solved_take.motion.frame_count
    rows = np.searchsorted(probe.frames, frames)
    order = [armature.joint(n) for n in solved_take.skeleton.names]
    expected = to_blender(pose.positions[frames])
    error = np.linalg.norm(armature.heads[rows][:, order] - expected, axis=-1)
    # End sites: Blender puts the tail of a leaf bone at the BVH End Site.
    for joint, end_name in END_SITE_NAMES.items():
        j = JOINT[joint]
        tail = armature.tails[rows][:, armature.joint(joint)]
        end_error = np.linalg.norm(tail - to_blender(pose.end_sites[j][frames]), axis=-1)
        assert end_error.max() < TOLERANCE_M, (end_name, end_error.max())
    print(f"BVH via Blender import_anim.bvh: max {error.max() * 1000:.5f} mm over {error.size} joint-frames")
    assert error.max() < TOLERANCE_M


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["cmu_131_01", "cmu_131_02", "cmu_131_03"])
def test_whole_cmu_clips_round_trip_through_bvh(clip, tmp_path):
    take = solve_cmu(clip, foot_locking=True)
    path = tmp_path / f"{clip}.bvh"
    write_bvh(path, take.skeleton, take.motion, take.fps)
    pose = take.pose()
    names, positions = _bvhtoolbox_positions(path)
    order = [names.index(n) for n in take.skeleton.names]
    assert np.linalg.norm(positions[:, order] / BVH_UNITS_PER_METRE - pose.positions, axis=-1).max() < TOLERANCE_M
    probe = blender_probe("bvh", path, take.fps, tmp_path)
    (armature,) = probe.armatures.values()
    rows = np.searchsorted(probe.frames, np.arange(take.motion.frame_count))
    order = [armature.joint(n) for n in take.skeleton.names]
    error = np.linalg.norm(armature.heads[rows][:, order] - to_blender(pose.positions), axis=-1)
    assert error.max() < TOLERANCE_M
