"""The skeleton solve on clean CMU motion: how close the rigid skeleton gets to the landmarks,
constant symmetric bone lengths, continuity, floor levelling, root motion options, and what
happens with unusable input."""

from __future__ import annotations

import numpy as np
import pytest

from exporter_svc.rotations import matrix_from_rotation_vector, quat_continuous, quat_from_matrix
from exporter_svc.skeleton import JOINT, build_skeleton
from exporter_svc.solve import (
    BODY_FROM_CAMERA,
    SolveOptions,
    TakeInput,
    Unsolvable,
    measure_body,
    solve_errors,
    solve_take,
)
from tests.exporter.conftest import cmu_global_landmarks, solve_cmu

# Fit of the rigid, symmetric skeleton to clean CMU-derived landmarks (clip 131_01, all 995
# frames, no foot locking). Measured: mean 3.9 mm over all targets; limbs ≤ 11 mm. The bigger
# misses are where the CMU skeleton itself is not rigid in BlazePose's terms: the mid-shoulder
# point moves with CMU's clavicles (neck ≤ 41 mm), the head point with its neck, and the toe tip
# with CMU's toe joint, which BlazePose (and so our skeleton) does not bend.
FIT_BOUNDS_MM = {  # target: (mean, max)
    "Hips": (0.01, 0.01), "LeftUpLeg": (0.01, 0.01), "RightUpLeg": (0.01, 0.01),
    "LeftLeg": (3, 3), "RightLeg": (3, 3), "LeftFoot": (2, 5), "RightFoot": (2, 5),
    "LeftArm": (2, 8), "RightArm": (2, 16), "LeftForeArm": (7, 9), "RightForeArm": (7, 9),
    "LeftHand": (9, 12), "RightHand": (9, 12), "LeftHand_End": (6, 9), "RightHand_End": (6, 9),
    "Neck": (6, 45), "Head": (6, 30), "LeftToe_End": (13, 20), "RightToe_End": (14, 30),
}


def test_solved_skeleton_fits_clean_cmu_landmarks():
    take = solve_cmu("cmu_131_01")
    errors = solve_errors(take)
    report = {name: (e.mean() * 1000, e.max() * 1000) for name, e in errors.items()}
    for name, (mean_bound, max_bound) in FIT_BOUNDS_MM.items():
        mean, worst = report[name]
        assert mean <= mean_bound and worst <= max_bound, f"{name}: mean {mean:.2f} mm, max {worst:.2f} mm"
    overall = np.concatenate(list(errors.values())).mean() * 1000
    assert overall < 5.0, overall


def test_bone_lengths_are_constant_and_left_right_symmetric():
    take = solve_cmu("cmu_131_02")
    pose = take.pose()
    for left, right in (("LeftArm", "RightArm"), ("LeftForeArm", "RightForeArm"), ("LeftLeg", "RightLeg"),
                        ("LeftFoot", "RightFoot"), ("LeftHand", "RightHand")):
        lengths = []
        for name in (left, right):
            j = JOINT[name]
            parent = take.skeleton.parents[j]
            bone = np.linalg.norm(pose.positions[:, j] - pose.positions[:, parent], axis=-1)
            assert np.ptp(bone) < 1e-9, f"{name} changes length over the take"
            lengths.append(bone[0])
        assert lengths[0] == pytest.approx(lengths[1], abs=1e-12)
    offsets = take.skeleton.offsets
    for j, name in enumerate(take.skeleton.names):
        if name.startswith("Left"):
            mirrored = offsets[JOINT["Right" + name[4:]]] * [-1, 1, 1]
            np.testing.assert_allclose(offsets[j], mirrored, atol=1e-12)


@pytest.mark.parametrize("clip", ["cmu_131_01", "cmu_131_02", "cmu_131_03"])
def test_rotations_are_continuous_frame_to_frame(clip):
    take = solve_cmu(clip)
    q = quat_continuous(quat_from_matrix(take.motion.local_rotations))
    assert np.all(np.sum(q[1:] * q[:-1], axis=-1) >= 0)  # one hemisphere: no sign flips
    step = np.degrees(2 * np.arccos(np.clip(np.abs(np.sum(q[1:] * q[:-1], axis=-1)), 0, 1)))
    # At 120 fps no body joint turns by more than ~15° between frames (no twist flips from the
    # solver). Forearms and hands are left out: their twist follows the thumb, and CMU subject
    # 131's RThumb itself flips by ~180° in single frames (a marker glitch in the source).
    thumb_driven = [JOINT[n] for n in ("LeftForeArm", "RightForeArm", "LeftHand", "RightHand")]
    body = np.delete(step, thumb_driven, axis=1)
    assert body.max() < 20.0, body.max()
    assert np.percentile(body, 99.9) < 10.0


@pytest.mark.parametrize("clip", ["cmu_131_01", "cmu_131_02", "cmu_131_03"])
def test_floor_is_levelled_even_when_the_camera_is_tilted(clip):
    landmarks = cmu_global_landmarks(clip)
    tilt_camera = matrix_from_rotation_vector(np.radians(np.array([12.0, 0.0, -7.0])))  # pitched and rolled
    tilted = landmarks @ tilt_camera.T
    root = 0.5 * (tilted[:, 23] + tilted[:, 24])
    take = solve_take(TakeInput(world=tilted - root[:, None], visibility=np.ones(tilted.shape[:2]), root=root),
                      SolveOptions(fps=120.0, foot_locking=False))
    # levelled = ground.rotation @ (body axes of the tilted input); CMU's own floor is level, so the
    # camera's tilt followed by the levelling must leave "up" up. The foot landmarks' heights vary
    # by ±3 cm along the walk, which limits the fit to about 2°.
    tilt_body = BODY_FROM_CAMERA @ tilt_camera @ BODY_FROM_CAMERA.T
    up_after = (take.ground.rotation @ tilt_body)[:, 1]
    assert np.degrees(np.arccos(np.clip(up_after[1], -1, 1))) < 3.0
    assert take.ground.tilt_deg == pytest.approx(13.9, abs=3.0)
    straight = solve_cmu(clip)
    assert straight.ground.tilt_deg < 3.0


def test_in_place_keeps_the_height_but_not_the_path():
    take = solve_cmu("cmu_131_01", in_place=True)
    exported = take.export_motion()
    assert np.all(exported.root_positions[:, [0, 2]] == 0)
    np.testing.assert_allclose(exported.root_positions[:, 1], take.motion.root_positions[:, 1])
    assert np.ptp(take.motion.root_positions[:, 2]) > 2.0  # the path existed: the clip walks 2.6 m


def test_bone_lengths_ignore_frames_where_a_landmark_is_not_visible():
    landmarks = cmu_global_landmarks("cmu_131_01")[:300].copy()
    clean = measure_body(landmarks, np.ones(landmarks.shape[:2], bool))
    visibility = np.ones(landmarks.shape[:2], bool)
    bad = np.arange(0, 300, 3)  # a third of the frames: left wrist thrown 40 cm off and marked invisible
    landmarks[bad, 15] += [0.4, 0.0, 0.0]
    visibility[bad, 15] = False
    measured = measure_body(landmarks, visibility)
    assert measured.forearm == pytest.approx(clean.forearm, abs=0.002)


def test_unusable_tracks_are_refused_with_a_reason():
    landmarks = cmu_global_landmarks("cmu_131_01")[:20]
    with pytest.raises(Unsolvable, match="shoulders and both hips"):
        solve_take(TakeInput(world=landmarks, visibility=np.zeros(landmarks.shape[:2])), SolveOptions(fps=30))
    broken = landmarks.copy()
    broken[3, 5] = np.nan
    with pytest.raises(Unsolvable, match="NaN"):
        solve_take(TakeInput(world=broken, visibility=np.ones(landmarks.shape[:2])), SolveOptions(fps=30))


def test_a_single_frame_solves():
    landmarks = cmu_global_landmarks("cmu_131_01")[:1]
    take = solve_take(TakeInput(world=landmarks, visibility=np.ones((1, 33))), SolveOptions(fps=30))
    assert take.motion.frame_count == 1
    assert not take.contacts.any_contact() or take.lock_report is not None


def test_rest_pose_is_a_t_pose_standing_on_the_floor():
    take = solve_cmu("cmu_131_01", slice(0, 200))
    skeleton = build_skeleton(take.skeleton.measures)
    rest = skeleton.rest_positions()
    assert rest[JOINT["LeftArm"], 0] > 0 > rest[JOINT["RightArm"], 0]  # performer's left on +X
    assert rest[JOINT["Head"], 1] > rest[JOINT["Neck"], 1] > 0 > rest[JOINT["LeftFoot"], 1]
    arm = rest[JOINT["LeftHand"]] - rest[JOINT["LeftArm"]]
    assert abs(arm[1]) < 1e-12 and abs(arm[2]) < 1e-12  # arms horizontal along X
    toe = rest[JOINT["LeftToeBase"]] - rest[JOINT["LeftFoot"]]
    assert toe[2] > 0  # feet point forward (+Z)
    sole = -skeleton.rest_hip_height()
    heel = rest[JOINT["LeftFoot"]] + skeleton.measures.foot_point("heel", "Left")
    assert min(heel[1], (rest[JOINT["LeftToeBase"]] + skeleton.end_sites[JOINT["LeftToeBase"]])[1]) == pytest.approx(sole)

