"""Rotation helpers, vectorised over leading axes: frames from two vectors, quaternions with
sign continuity, BVH Euler angles with wrap-free unwrapping.

Conventions: rotation matrices act on column vectors (`v' = R @ v`); quaternions are (w, x, y, z);
Euler channels follow BVH: "Zrotation Xrotation Yrotation" means R = Rz(a) @ Rx(b) @ Ry(c)
(intrinsic Z, X, Y), angles in degrees.
"""

from __future__ import annotations

import numpy as np

from mocap_common.bvh import axis_rotations

_EPS = 1e-9


def normalize(v: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (zero vectors stay zero)."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, _EPS)


def reject(v: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """The part of `v` perpendicular to the unit vector `axis`."""
    return v - np.sum(v * axis, axis=-1, keepdims=True) * axis


def frame(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Orthonormal frames (..., 3, 3) with columns [primary, secondary ⊥ primary, primary × secondary].

    `primary` is kept exactly (normalised); `secondary` only picks the twist about it.
    """
    p = normalize(primary)
    s = normalize(reject(secondary, p))
    return np.stack([p, s, np.cross(p, s)], axis=-1)


def rotation_between_frames(rest_primary: np.ndarray, rest_secondary: np.ndarray,
                            primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """The rotation R that maps the rest pair onto the current pair: R @ rest_primary ∥ primary,
    and R @ rest_secondary lies in the (primary, secondary) half-plane."""
    rest = frame(rest_primary, rest_secondary)
    current = frame(primary, secondary)
    return current @ np.swapaxes(rest, -1, -2)


def rotation_from_to(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation (..., 3, 3) taking direction `a` onto direction `b`."""
    a, b = normalize(a), normalize(b)
    axis = np.cross(a, b)
    sin = np.linalg.norm(axis, axis=-1)
    cos = np.sum(a * b, axis=-1)
    angle = np.arctan2(sin, cos)
    # For (anti)parallel vectors any perpendicular axis will do; pick one stably.
    fallback = np.cross(a, np.where(np.abs(a[..., :1]) < 0.9, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]))
    axis = np.where((sin < 1e-12)[..., None], fallback, axis)
    return axis_angle_matrix(normalize(axis), angle)


def axis_angle_matrix(axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: rotations about unit `axis` (..., 3) by `angle` radians (...)."""
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    c, s = np.cos(angle), np.sin(angle)
    t = 1.0 - c
    rows = [
        [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
        [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
        [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def rotation_vector(r: np.ndarray) -> np.ndarray:
    """Axis × angle (radians) of rotation matrices (..., 3, 3)."""
    q = quat_from_matrix(r)
    q = np.where(q[..., :1] < 0, -q, q)
    vec = q[..., 1:]
    sin_half = np.linalg.norm(vec, axis=-1)
    angle = 2.0 * np.arctan2(sin_half, q[..., 0])
    return normalize(vec) * angle[..., None]


def matrix_from_rotation_vector(v: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(v, axis=-1)
    return axis_angle_matrix(normalize(v), angle)


def quat_from_matrix(r: np.ndarray) -> np.ndarray:
    """(..., 3, 3) → (..., 4) unit quaternions (w, x, y, z), numerically robust for all angles."""
    m = np.asarray(r, dtype=np.float64)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # Four candidate formulas; use the one with the largest (best-conditioned) divisor.
    candidates = np.stack([
        np.stack([1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01], axis=-1),
        np.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], axis=-1),
        np.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], axis=-1),
        np.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], axis=-1),
    ], axis=-2)
    traces = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1)
    best = np.argmax(traces, axis=-1)
    q = np.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    return normalize(q)


def matrix_from_quat(q: np.ndarray) -> np.ndarray:
    q = normalize(np.asarray(q, dtype=np.float64))
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def quat_continuous(q: np.ndarray) -> np.ndarray:
    """Flips signs along axis 0 (time) so consecutive quaternions lie in the same hemisphere
    (q and −q are the same rotation; interpolating across a flip spins the long way round)."""
    out = np.array(q, dtype=np.float64, copy=True)
    for t in range(1, out.shape[0]):
        flip = np.sum(out[t] * out[t - 1], axis=-1) < 0
        out[t][flip] *= -1.0
    return out


def euler_zxy_from_matrix(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both Euler solutions (..., 3) in degrees of R = Rz(a) Rx(b) Ry(c), as (a, b, c).

    The first has b in [-90°, 90°]; the second is (a + 180°, 180° − b, c + 180°), the same rotation.
    """
    sb = np.clip(r[..., 2, 1], -1.0, 1.0)
    b = np.arcsin(sb)
    cb = np.sqrt(np.maximum(0.0, 1.0 - sb * sb))
    gimbal = cb < 1e-9
    a = np.where(gimbal, 0.0, np.arctan2(-r[..., 0, 1], r[..., 1, 1]))
    # At gimbal lock only a + c (or a − c) is defined: put it all in c.
    c_gimbal = np.arctan2(r[..., 0, 2], r[..., 0, 0])
    c = np.where(gimbal, c_gimbal, np.arctan2(-r[..., 2, 0], r[..., 2, 2]))
    first = np.degrees(np.stack([a, b, c], axis=-1))
    second = first + np.array([180.0, 0.0, 180.0])
    second[..., 1] = 180.0 - first[..., 1]
    return first, second


def matrix_from_euler_zxy(angles_deg: np.ndarray) -> np.ndarray:
    return (axis_rotations("Z", angles_deg[..., 0]) @ axis_rotations("X", angles_deg[..., 1])
            @ axis_rotations("Y", angles_deg[..., 2]))


def euler_zxy_continuous(r: np.ndarray) -> np.ndarray:
    """Euler angles (T, ..., 3) in degrees for rotations (T, ..., 3, 3), continuous in time.

    Per frame the solution (of the two) closest to the previous frame is taken, and every angle is
    moved by whole turns next to its previous value, so channels never jump by ±360° (wrap) or
    switch branch; the first frame uses the principal solution in (−180°, 180°].
    """
    first, second = euler_zxy_from_matrix(r)
    out = np.empty_like(first)
    out[0] = _wrap180(first[0])
    for t in range(1, first.shape[0]):
        prev = out[t - 1]
        cand_a = _nearest_turn(first[t], prev)
        cand_b = _nearest_turn(second[t], prev)
        use_b = np.sum((cand_b - prev) ** 2, axis=-1) < np.sum((cand_a - prev) ** 2, axis=-1)
        out[t] = np.where(use_b[..., None], cand_b, cand_a)
    return out


def _wrap180(angles: np.ndarray) -> np.ndarray:
    return angles - 360.0 * np.round(angles / 360.0)


def _nearest_turn(angles: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return angles + 360.0 * np.round((reference - angles) / 360.0)
