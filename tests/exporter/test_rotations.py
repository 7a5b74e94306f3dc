"""Rotation helpers: BVH Euler decomposition (both branches), continuity (no sign flips, no
±360° wraps), quaternion conversions — checked against SciPy's independent implementation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from exporter_svc.rotations import (
    euler_zxy_continuous,
    euler_zxy_from_matrix,
    matrix_from_euler_zxy,
    matrix_from_quat,
    quat_continuous,
    quat_from_matrix,
    rotation_between_frames,
    rotation_from_to,
)

angles = st.tuples(st.floats(-180, 180), st.floats(-89.9, 89.9), st.floats(-180, 180))


@given(angles)
@settings(max_examples=200, deadline=None)
def test_euler_zxy_matches_scipy_and_both_branches_rebuild_the_matrix(abc):
    matrix = Rotation.from_euler("ZXY", abc, degrees=True).as_matrix()  # intrinsic = Rz·Rx·Ry
    first, second = euler_zxy_from_matrix(matrix)
    np.testing.assert_allclose(matrix_from_euler_zxy(first), matrix, atol=1e-9)
    np.testing.assert_allclose(matrix_from_euler_zxy(second), matrix, atol=1e-9)
    np.testing.assert_allclose(matrix_from_euler_zxy(np.array(abc)), matrix, atol=1e-9)


def test_euler_channels_never_wrap_when_a_joint_spins_past_180_degrees():
    yaw = np.linspace(0, 720, 400)  # two full turns about Y
    matrices = Rotation.from_euler("ZXY", np.stack([5 + 0 * yaw, 10 + 0 * yaw, yaw], axis=1), degrees=True).as_matrix()
    euler = euler_zxy_continuous(matrices)
    assert np.abs(np.diff(euler, axis=0)).max() < 3.0  # step is 1.8° per frame
    np.testing.assert_allclose(euler[-1, 2] - euler[0, 2], 720, atol=1e-6)
    np.testing.assert_allclose(matrix_from_euler_zxy(euler), matrices, atol=1e-9)


def test_euler_picks_the_branch_that_keeps_the_middle_angle_continuous_through_90_degrees():
    pitch = np.linspace(60, 120, 121)  # X rotation through +90° (gimbal) and beyond
    matrices = Rotation.from_euler("ZXY", np.stack([0 * pitch + 20, pitch, 0 * pitch - 30], axis=1), degrees=True).as_matrix()
    euler = euler_zxy_continuous(matrices)
    np.testing.assert_allclose(matrix_from_euler_zxy(euler), matrices, atol=1e-6)
    steps = np.abs(np.diff(euler, axis=0))
    assert steps[:, 1].max() < 1.0
    # Away from the singular frame the other channels stay put (no 180° branch jump).
    assert np.median(steps[:, 0]) < 1e-6 and np.median(steps[:, 2]) < 1e-6


@given(st.lists(angles, min_size=2, max_size=20))
@settings(max_examples=100, deadline=None)
def test_quaternions_round_trip_and_never_flip_sign(seq):
    matrices = Rotation.from_euler("ZXY", seq, degrees=True).as_matrix()
    q = quat_from_matrix(matrices)
    np.testing.assert_allclose(matrix_from_quat(q), matrices, atol=1e-9)
    flipped = q * np.where(np.arange(len(q)) % 2 == 0, 1.0, -1.0)[:, None]  # worst case: alternate signs
    fixed = quat_continuous(flipped)
    assert np.all(np.sum(fixed[1:] * fixed[:-1], axis=1) >= 0)
    np.testing.assert_allclose(matrix_from_quat(fixed), matrices, atol=1e-9)


def test_rotation_between_frames_maps_rest_pair_onto_current_pair():
    rng = np.random.default_rng(1)
    rest_p, rest_s, p, s = rng.normal(size=(4, 50, 3))
    r = rotation_between_frames(rest_p, rest_s, p, s)
    mapped = np.einsum("nij,nj->ni", r, rest_p / np.linalg.norm(rest_p, axis=1, keepdims=True))
    np.testing.assert_allclose(mapped, p / np.linalg.norm(p, axis=1, keepdims=True), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-9)


def test_rotation_from_to_handles_opposite_vectors():
    a = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.3, -0.2, 0.9]])
    b = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [-0.1, 0.5, 0.2]])
    r = rotation_from_to(a, b)
    got = np.einsum("nij,nj->ni", r, a / np.linalg.norm(a, axis=1, keepdims=True))
    np.testing.assert_allclose(got, b / np.linalg.norm(b, axis=1, keepdims=True), atol=1e-9)
