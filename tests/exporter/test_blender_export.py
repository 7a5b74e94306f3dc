"""FBX and GLB written by the Blender child, re-imported with Blender's own importers (another
child process) → joint world positions match the solved skeleton frame by frame; the GLB passes
the Khronos glTF validator.

Units and axes: the solved skeleton is in metres, BVH body axes (Y up). The files are Y up (FBX in
centimetres with its unit scale recorded, GLB in metres); Blender's importers bring both back to
its Z-up metres, so the expected positions are K · p with K = the BVH → Blender axis change, and
no scale.
"""

from __future__ import annotations

import asyncio
import copy
import sys

import numpy as np
import pytest

from exporter_svc.blender_job import BlenderPerson, run_blender, write_spec
from exporter_svc.skeleton import END_SITE_NAMES
from tests.exporter.conftest import blender_probe, solve_cmu, to_blender, validate_gltf

TOLERANCE_M = 0.001
SECOND_START = 10  # person 2 enters the take 10 frames later
SECOND_SHIFT = np.array([1.5, 0.0, -0.5])  # … and walks 1.5 m to the side


def _two_people(take):
    second = copy.deepcopy(take.motion)
    second.root_positions = second.root_positions + SECOND_SHIFT
    return [BlenderPerson(1, "person-1", take.skeleton, take.motion, 0),
            BlenderPerson(7, "person-7", take.skeleton, second, SECOND_START)]


def _export(persons, fps, tmp_path):
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    outputs = write_spec(spec_dir, persons, fps, ["fbx", "glb"], "take")
    return asyncio.run(run_blender(spec_dir, outputs, python=sys.executable, timeout_s=240))


def _check_armature(armature, take, motion_shift, frames, start):
    """Max error (m) over the person's frames of every joint's position and of every End Site,
    placed with the imported bone's rotation. FBX and glTF store joints, not bone tails (importers
    guess a leaf bone's tail), so a leaf bone's rotation is checked through its rotation relative
    to rest (our rest pose has identity rotations): End Site = head + turn · K · offset."""
    pose = take.pose()
    local = frames - start
    keep = (local >= 0) & (local < take.motion.frame_count)
    rows, local = np.flatnonzero(keep), local[keep]
    index = [armature.joint(n) for n in take.skeleton.names]
    heads = armature.heads[rows][:, index]
    worst = np.linalg.norm(heads - to_blender(pose.positions[local] + motion_shift), axis=-1).max()
    for j, offset in take.skeleton.end_sites.items():
        turn = armature.turns[rows][:, armature.joint(take.skeleton.names[j])]
        end = heads[:, j] + turn @ to_blender(offset)
        worst = max(worst, np.linalg.norm(end - to_blender(pose.end_sites[j][local] + motion_shift), axis=-1).max())
    return worst, len(rows)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("blender-export")
    take = solve_cmu("cmu_131_01", slice(0, 240), foot_locking=True)
    run = _export(_two_people(take), take.fps, tmp_path)
    return take, run, tmp_path


@pytest.mark.parametrize("kind", ["fbx", "glb"])
def test_reimported_joint_positions_match_the_solved_skeleton(exported, kind):
    take, run, tmp_path = exported
    probe = blender_probe(kind, run.outputs[kind], take.fps, tmp_path)
    assert sorted(probe.armatures) == ["person-1", "person-7"]  # one armature per person
    for name, shift, start in (("person-1", 0.0, 0), ("person-7", SECOND_SHIFT, SECOND_START)):
        armature = probe.armatures[name]
        assert set(take.skeleton.names) <= set(armature.names)
        error, frames = _check_armature(armature, take, shift, probe.frames, start)
        print(f"{kind.upper()} {name}: max {error * 1000:.5f} mm over {frames} frames")
        assert frames == take.motion.frame_count
        assert error < TOLERANCE_M
    assert run.startup_seconds > 0 and run.seconds >= run.startup_seconds


def test_glb_passes_the_khronos_validator(exported):
    _, run, _ = exported
    report = validate_gltf(run.outputs["glb"])
    print("glTF validator:", {k: report[k] for k in ("validatorVersion", "numErrors", "numWarnings", "numInfos")})
    assert report["numErrors"] == 0, report["messages"]
    assert report["numWarnings"] == 0, report["messages"]
    assert report["info"]["hasSkins"] and report["info"]["animationCount"] == 1


def test_end_sites_and_bone_names_are_game_engine_friendly(exported):
    take, run, tmp_path = exported
    probe = blender_probe("fbx", run.outputs["fbx"], take.fps, tmp_path)
    names = probe.armatures["person-1"].names
    assert not [n for n in names if n.endswith("_end")]  # add_leaf_bones=False: no extra leaf bones
    assert "mixamorig:Hips" not in names and "Hips" in names
    assert set(END_SITE_NAMES) <= set(names)


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["cmu_131_01", "cmu_131_02", "cmu_131_03"])
def test_whole_cmu_clips_round_trip_through_fbx_and_glb(clip, tmp_path):
    take = solve_cmu(clip, foot_locking=True)
    run = _export(_two_people(take), take.fps, tmp_path)
    assert validate_gltf(run.outputs["glb"])["numErrors"] == 0
    for kind in ("fbx", "glb"):
        probe = blender_probe(kind, run.outputs[kind], take.fps, tmp_path)
        for name, shift, start in (("person-1", 0.0, 0), ("person-7", SECOND_SHIFT, SECOND_START)):
            error, frames = _check_armature(probe.armatures[name], take, shift, probe.frames, start)
            assert frames == take.motion.frame_count and error < TOLERANCE_M, (kind, name, error)
