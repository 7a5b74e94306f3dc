"""Ground plane, foot contacts and foot locking.

Ground: the floor is fitted to the lowest foot landmark of each foot per frame (heel or toe tip,
whichever is lower). Start from the take's average trunk direction as "up" (camera up if that
leans more than 30°), keep the points within 8 cm of the lowest 5 %, and look at their spread
(PCA): when they cover an area (std ≥ 15 cm in two directions) the floor's normal is the plane's
least-squares normal; when they lie along a line (walking straight, std ≥ 30 cm along it) the
floor contains that line and up is the trunk direction made perpendicular to it (so pitch along
the walk comes from the floor, roll from the body); otherwise up is the trunk direction. Three
rounds; a normal more than 30° from the camera's up is not trusted. The body is then rotated so
the floor normal is +Y and shifted so the floor is y = 0 (removing a tilted camera's pitch/roll).

Contacts: for each of the four contact points (left heel, left toe tip, right heel, right toe tip,
as placed by the solved skeleton) a frame is in contact when the point is within 5 cm of its own
lowest level (5th percentile of its height) and its horizontal speed, after a Gaussian smoothing
of 40 ms, is under 0.35 m/s. Gaps up to 60 ms are filled and contacts shorter than 100 ms dropped.
A contact whose point drifts more than 3 cm (horizontally, smoothed) is split into pieces.

Locking (IK-style leg adjustment plus a small root correction):
- Anchor: each contact piece is held at the median horizontal position of its point; its height
  stays the solved one (only horizontal travel is sliding). Between touching pieces of a drifting
  contact the anchor glides over 30 ms instead of jumping.
- One point down: the ankle target is the anchor minus the foot's solved orientation applied to
  that point's offset from the ankle (the foot pivots about the pinned point).
- Heel and toe down: the foot is turned to lie as this take's planted feet lie (median heel → toe
  rise), along the line between the two anchors, so both are pinned; the anchors of the contact
  that began later are shifted to be one foot length from the earlier one. The turn fades in over
  100 ms before the second point lands and out after the first lifts, pinned on the other point.
- Legs: a two-bone IK on thigh and shin (law of cosines; the knee bends towards the thigh's own
  forward axis, the solve's knee direction) moves the ankle to its target; the foot keeps its
  (turned) global orientation.
- Root: when a target is out of the leg's reach (99.95 % of its length) the hips are lowered just
  enough (at most a quarter of the thigh), widened by ±80 ms and smoothed, so the leg can reach.
- Outside contact the ankle correction and the turn carry on continuously: across short gaps they
  move linearly from one contact's to the next's, longer gaps fade out and in over 150 ms.
Residual misses (target still out of reach) are reported in `LockReport`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d, maximum_filter1d

from exporter_svc.rotations import (
    matrix_from_rotation_vector,
    normalize,
    reject,
    rotation_from_to,
    rotation_vector,
)
from exporter_svc.skeleton import JOINT, Motion, Pose, Skeleton, forward_kinematics

UP = np.array([0.0, 1.0, 0.0])
FLOOR_BAND_M = 0.08
MIN_TILT_SPREAD_M = 0.15
MIN_LINE_SPREAD_M = 0.3
MAX_TILT_DEG = 30.0
CONTACT_HEIGHT_M = 0.05
CONTACT_SPEED_M_S = 0.35
SPEED_SMOOTHING_S = 0.04
FILL_GAP_S = 0.06
MIN_CONTACT_S = 0.10
BLEND_S = 0.15
LOCK_RADIUS_M = 0.03
ANCHOR_BLEND_S = 0.03
ROLL_BLEND_S = 0.1
DROP_BLEND_S = 0.08  # the hips are lowered this long before and after a frame that needs it
REACH_MARGIN = 0.9995  # a planted leg may straighten to this fraction of its length
MAX_HIP_DROP_FRACTION = 0.25  # of the thigh length

CONTACT_POINTS = ("LeftHeel", "LeftToe", "RightHeel", "RightToe")


@dataclass(frozen=True)
class Ground:
    """Levelling transform: levelled = rotation @ p − (0, height, 0)."""

    rotation: np.ndarray
    height: float
    tilt_deg: float

    def apply(self, p: np.ndarray) -> np.ndarray:
        return p @ self.rotation.T - np.array([0.0, self.height, 0.0])


def estimate_ground(body: np.ndarray) -> Ground:
    """Fits the floor under landmarks (F, 33, 3) in body axes (see the module docstring)."""
    feet = body[:, [29, 31, 30, 32]]  # L heel, L toe, R heel, R toe
    left = np.where((feet[:, 0, 1] < feet[:, 1, 1])[:, None], feet[:, 0], feet[:, 1])
    right = np.where((feet[:, 2, 1] < feet[:, 3, 1])[:, None], feet[:, 2], feet[:, 3])
    points = np.concatenate([left, right])
    body_up = _body_up(body)
    normal = body_up
    level = float(np.percentile(points @ normal, 5))
    for _ in range(3):
        near = points[points @ normal < level + FLOOR_BAND_M]
        if len(near) < 10:
            break
        centre = near.mean(axis=0)
        _, singular, vt = np.linalg.svd(near - centre, full_matrices=False)
        spread = singular / np.sqrt(len(near))
        if spread[1] >= MIN_TILT_SPREAD_M:  # contacts cover an area: the plane's own normal
            candidate = vt[2]
        elif spread[0] >= MIN_LINE_SPREAD_M:  # a line (walking straight): floor contains it
            candidate = normalize(reject(body_up, vt[0]))
        else:
            candidate = body_up
        candidate = candidate if candidate @ UP >= 0 else -candidate
        if np.degrees(np.arccos(np.clip(candidate @ UP, -1.0, 1.0))) <= MAX_TILT_DEG:
            normal = candidate
        level = float(np.percentile(points @ normal, 5))
    heights = points @ normal
    near_heights = heights[heights < level + FLOOR_BAND_M]
    height = float(np.median(near_heights)) if len(near_heights) else level
    tilt = float(np.degrees(np.arccos(np.clip(normal @ UP, -1.0, 1.0))))
    return Ground(rotation=rotation_from_to(normal, UP), height=height, tilt_deg=tilt)


def _body_up(body: np.ndarray) -> np.ndarray:
    """The take's average trunk direction (mid-hip → mid-shoulder); camera up if it leans > 30°."""
    trunk = 0.5 * (body[:, 11] + body[:, 12]) - 0.5 * (body[:, 23] + body[:, 24])
    up = normalize(normalize(trunk).mean(axis=0))
    if not np.all(np.isfinite(up)) or np.degrees(np.arccos(np.clip(up @ UP, -1.0, 1.0))) > MAX_TILT_DEG:
        return UP.copy()
    return up


@dataclass
class Contacts:
    """Contact intervals per contact point: `labels[f, k]` is 0 when point k is off the ground in
    frame f, else the number of the interval (1, 2, ...) it belongs to. Adjacent intervals can
    touch: a drifting contact is split where the point has moved LOCK_RADIUS_M."""

    labels: np.ndarray  # (F, 4) int, columns in CONTACT_POINTS order

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    def any_contact(self) -> bool:
        return bool(self.mask.any())

    def foot_contact_fraction(self) -> float:
        """Fraction of frames in which at least one foot touches the ground."""
        return float(self.mask.any(axis=1).mean()) if len(self.labels) else 0.0

    def intervals(self, point: int) -> list[tuple[int, int]]:
        """[start, stop) of each contact interval of one point."""
        column = self.labels[:, point]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], column, [0]])))
        bounds = np.concatenate([edges, [len(column)]])
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if a < len(column) and column[a] > 0]


@dataclass
class LockReport:
    frames_adjusted: int
    max_residual_m: float  # largest distance the IK fell short of an ankle target
    unreachable_frames: int
    max_hip_drop_m: float  # largest lowering of the hips that kept planted feet within reach


def contact_point_positions(skeleton: Skeleton, motion: Motion) -> np.ndarray:
    """(F, 4, 3) positions of the four contact points on the solved skeleton."""
    pose = forward_kinematics(skeleton, motion)
    out = []
    for side in ("Left", "Right"):
        foot = JOINT[f"{side}Foot"]
        ankle, rot = pose.positions[:, foot], pose.rotations[:, foot]
        for point in ("heel", "toe"):
            out.append(ankle + rot @ skeleton.measures.foot_point(point, side))
    return np.stack(out, axis=1)


def detect_contacts(skeleton: Skeleton, motion: Motion, fps: float) -> Contacts:
    points = contact_point_positions(skeleton, motion)
    return Contacts(labels=contact_labels(points, fps))


def contact_labels(points: np.ndarray, fps: float) -> np.ndarray:
    """(F, K, 3) point paths on a levelled floor → (F, K) contact interval labels."""
    frames = points.shape[0]
    labels = np.zeros(points.shape[:2], np.int64)
    if frames < 2:
        return labels
    sigma = max(SPEED_SMOOTHING_S * fps, 0.5)
    smooth = gaussian_filter1d(points, sigma, axis=0, mode="nearest")
    velocity = np.gradient(smooth, axis=0) * fps
    speed = np.linalg.norm(velocity[..., [0, 2]], axis=-1)
    heights = points[..., 1]
    lowest = np.percentile(heights, 5, axis=0)
    mask = (heights < np.maximum(lowest, 0.0) + CONTACT_HEIGHT_M) & (speed < CONTACT_SPEED_M_S)
    for k in range(mask.shape[1]):
        flags = _clean(mask[:, k], int(round(FILL_GAP_S * fps)), int(round(MIN_CONTACT_S * fps)))
        label = 0
        for start, stop in _segments(flags):
            for a, b in _split_drift(smooth[start:stop, k, :]):
                label += 1
                labels[start + a: start + b, k] = label
    return labels


def _split_drift(path: np.ndarray) -> list[tuple[int, int]]:
    """Splits a contact interval wherever the (smoothed) point strays more than LOCK_RADIUS_M
    horizontally from the mean of the piece so far, so a locked anchor never sits far from it."""
    pieces, start, total = [], 0, np.zeros(2)
    for t in range(len(path)):
        xz = path[t, [0, 2]]
        if t > start and np.linalg.norm(xz - total / (t - start)) > LOCK_RADIUS_M:
            pieces.append((start, t))
            start, total = t, np.zeros(2)
        total += xz
    pieces.append((start, len(path)))
    return pieces


def _segments(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _clean(flags: np.ndarray, fill: int, minimum: int) -> np.ndarray:
    out = flags.copy()
    for start, stop in _segments(~flags):
        if 0 < start and stop < len(flags) and stop - start <= fill:
            out[start:stop] = True
    for start, stop in _segments(out):
        if stop - start < max(minimum, 1):
            out[start:stop] = False
    return out


def foot_skate(points: np.ndarray, mask: np.ndarray) -> float:
    """Total horizontal travel (metres) of contact points between consecutive contact frames."""
    if len(points) < 2:
        return 0.0
    step = np.linalg.norm(np.diff(points[..., [0, 2]], axis=0), axis=-1)
    both = mask[1:] & mask[:-1]
    return float(step[both].sum())


@dataclass
class _LegPlan:
    """What locking wants from one leg: ankle targets, foot turn, and how much (0..1)."""

    side: str
    target: np.ndarray  # (F, 3) ankle target
    turn: np.ndarray  # (F, 3) rotation vector applied to the foot's global rotation
    weight: np.ndarray  # (F,) 1 in contact, fading to 0 around it


def lock_feet(skeleton: Skeleton, motion: Motion, contacts: Contacts, fps: float) -> tuple[Motion, LockReport]:
    """Pins contact points to their anchors with leg IK (see the module docstring)."""
    pose = forward_kinematics(skeleton, motion)
    plans = [plan for s, side in enumerate(("Left", "Right"))
             if (plan := _plan_leg(skeleton, pose, contacts, side, fps)) is not None]
    drop = _hip_drop(skeleton, pose, plans, max(1, int(round(DROP_BLEND_S * fps))))
    root = motion.root_positions.copy()
    root[:, 1] -= drop
    local = motion.local_rotations.copy()
    adjusted, unreachable, residuals = 0, 0, [0.0]
    r_hips = pose.rotations[:, JOINT["Hips"]]
    for plan in plans:
        hip_j, knee_j, ankle_j = (JOINT[f"{plan.side}{n}"] for n in ("UpLeg", "Leg", "Foot"))
        lowered = np.array([0.0, 1.0, 0.0]) * drop[:, None]
        hip, knee, ankle = (pose.positions[:, j] - lowered for j in (hip_j, knee_j, ankle_j))
        touched = plan.weight > 0
        target = ankle + (plan.target - ankle) * plan.weight[:, None]
        new_knee, reached, residual = _two_bone_ik(hip, knee, target, skeleton, plan.side, pose.rotations[:, hip_j])
        adjusted += int(touched.sum())
        unreachable += int((~reached & touched).sum())
        residuals.append(float(residual[touched].max(initial=0.0)))
        shin_length = np.linalg.norm(skeleton.offsets[ankle_j])
        new_ankle = new_knee + normalize(target - new_knee) * shin_length
        r_thigh = rotation_from_to(knee - hip, new_knee - hip) @ pose.rotations[:, hip_j]
        r_shin = rotation_from_to(ankle - knee, new_ankle - new_knee) @ pose.rotations[:, knee_j]
        r_foot = matrix_from_rotation_vector(plan.turn * plan.weight[:, None]) @ pose.rotations[:, ankle_j]
        local[touched, hip_j] = _t(r_hips[touched]) @ r_thigh[touched]
        local[touched, knee_j] = _t(r_thigh[touched]) @ r_shin[touched]
        local[touched, ankle_j] = _t(r_shin[touched]) @ r_foot[touched]
    report = LockReport(frames_adjusted=adjusted, max_residual_m=max(residuals), unreachable_frames=unreachable,
                        max_hip_drop_m=float(drop.max(initial=0.0)))
    return Motion(root_positions=root, local_rotations=local), report


def _plan_leg(skeleton: Skeleton, pose: Pose, contacts: Contacts, side: str, fps: float) -> _LegPlan | None:
    """Anchors for heel and toe contacts of one foot → ankle targets and foot turns.

    Heel only or toe only in contact: the foot keeps its solved orientation and pivots about the
    pinned point. Both in contact: the foot is also turned to lie as planted feet lie in this take
    (the median heel → toe rise over frames with both down), heel → toe along the line between the
    two anchors, which pins both; the turn is faded in over ROLL_BLEND_S before the second point
    lands and out after the first lifts, while the other point stays pinned, so nothing pops.
    """
    heel_k, toe_k = CONTACT_POINTS.index(f"{side}Heel"), CONTACT_POINTS.index(f"{side}Toe")
    heel_on, toe_on = contacts.mask[:, heel_k], contacts.mask[:, toe_k]
    locked = heel_on | toe_on
    if not locked.any():
        return None
    ankle_j = JOINT[f"{side}Foot"]
    heel_loc = skeleton.measures.foot_point("heel", side)
    toe_loc = skeleton.measures.foot_point("toe", side)
    length = float(np.linalg.norm(toe_loc - heel_loc))
    ankle, r_foot = pose.positions[:, ankle_j], pose.rotations[:, ankle_j]
    heel, toe = ankle + r_foot @ heel_loc, ankle + r_foot @ toe_loc
    both = heel_on & toe_on
    # The planted foot's pitch: heel and toe landmarks need not be level on a flat floor, so use
    # the take's own median heel → toe rise over the frames where both are down.
    rise = float(np.median((toe - heel)[both, 1])) if both.any() else 0.0
    rise = float(np.clip(rise, -0.9 * length, 0.9 * length))
    reach = float(np.sqrt(length**2 - rise**2))
    heel_anchor, toe_anchor = _anchors(heel, contacts, heel_k, fps), _anchors(toe, contacts, toe_k, fps)
    _make_rigid(heel_anchor, toe_anchor, heel_on, toe_on, reach)
    turn = np.zeros((len(locked), 3))
    if both.any():
        nearest_both = _nearest_locked(both)
        ramp = max(1, int(round(ROLL_BLEND_S * fps)))
        w = _fade_weights(both, ramp)
        near = w > 0
        span = (toe_anchor - heel_anchor)[nearest_both[near]] * [1.0, 0.0, 1.0]
        flat = normalize(span) * reach + rise * UP
        turn[near] = rotation_vector(rotation_from_to((toe - heel)[near], flat)) * w[near, None]
    r_turned = matrix_from_rotation_vector(turn) @ r_foot
    # The pinned point: the one in contact; with both, the one whose contact began first (so its
    # height, which is the solved one, carries on without a jump when the second one lands).
    pin_toe = toe_on & (~heel_on | _toe_first(heel_on, toe_on))
    pin_heel = heel_on & ~pin_toe
    target = ankle.copy()
    target[pin_heel] = (heel_anchor - r_turned @ heel_loc)[pin_heel]
    target[pin_toe] = (toe_anchor - r_turned @ toe_loc)[pin_toe]
    # Switching the pinned point (the first one lifts) can step the height by the difference
    # between solved and flat foot: smooth heights only — vertical motion is not sliding.
    sigma = ANCHOR_BLEND_S * fps
    for start, stop in _segments(locked):
        target[start:stop, 1] = gaussian_filter1d(target[start:stop, 1], sigma, mode="nearest")
    blend = max(1, int(round(BLEND_S * fps)))
    shift = _spread(target - ankle, locked, blend)
    turn = _spread(turn, locked, blend)
    touched = locked | np.any(shift != 0, axis=1) | np.any(turn != 0, axis=1)
    return _LegPlan(side=side, target=ankle + shift, turn=turn, weight=touched.astype(np.float64))


def _hip_drop(skeleton: Skeleton, pose: Pose, plans: list[_LegPlan], blend: int) -> np.ndarray:
    """How far (metres, ≥ 0) to lower the hips per frame so locked ankles stay within reach.

    Smoothed (a running maximum, then a Gaussian) so the hips never jerk."""
    frames = pose.positions.shape[0]
    need = np.zeros(frames)
    for plan in plans:
        hip_j = JOINT[f"{plan.side}UpLeg"]
        reach = (np.linalg.norm(skeleton.offsets[JOINT[f"{plan.side}Leg"]])
                 + np.linalg.norm(skeleton.offsets[JOINT[f"{plan.side}Foot"]])) * REACH_MARGIN
        ankle = pose.positions[:, JOINT[f"{plan.side}Foot"]]
        target = ankle + (plan.target - ankle) * plan.weight[:, None]
        v = target - pose.positions[:, hip_j]
        # Lowering by d: |v + d·up|² ≤ reach²  ⇔  d ≥ −v_y − sqrt(v_y² − |v|² + reach²).
        disc = v[:, 1] ** 2 - np.sum(v * v, axis=1) + reach**2
        d = np.where(disc >= 0, -v[:, 1] - np.sqrt(np.maximum(disc, 0.0)), -v[:, 1])
        need = np.maximum(need, np.where(plan.weight > 0, d, 0.0))
    need = np.clip(need, 0.0, MAX_HIP_DROP_FRACTION * skeleton.measures.thigh)
    if not need.any():
        return need
    widened = maximum_filter1d(need, size=2 * blend + 1, mode="nearest")
    return np.maximum(gaussian_filter1d(widened, blend / 3.0, mode="nearest"), need)


def _t(m: np.ndarray) -> np.ndarray:
    return np.swapaxes(m, -1, -2)


def _anchors(path: np.ndarray, contacts: Contacts, point: int, fps: float) -> np.ndarray:
    """Per frame, where the contact point is held: horizontally the median of `path` over its
    contact interval; vertically where the solve put it (only horizontal travel is sliding, and a
    point's height varies within a contact, e.g. as the heel peels off).

    Where a drifting contact was split into touching intervals the anchor moves from one median
    to the next smoothly (a Gaussian of ANCHOR_BLEND_S over the run of touching intervals)
    instead of jumping in one frame."""
    out = path.copy()
    for start, stop in contacts.intervals(point):
        out[start:stop, 0::2] = np.median(path[start:stop, 0::2], axis=0)
    sigma = ANCHOR_BLEND_S * fps
    for start, stop in _segments(contacts.mask[:, point]):
        if len(np.unique(contacts.labels[start:stop, point])) > 1:
            out[start:stop, 0::2] = gaussian_filter1d(out[start:stop, 0::2], sigma, axis=0, mode="nearest")
    return out


def _toe_first(heel_on: np.ndarray, toe_on: np.ndarray) -> np.ndarray:
    """Per frame: True where both are down and the toe's current contact began before the heel's."""
    out = np.zeros(len(heel_on), bool)
    for h0, h1 in _segments(heel_on):
        for t0, t1 in _segments(toe_on):
            first, last = max(h0, t0), min(h1, t1)
            if first < last and t0 < h0:
                out[first:last] = True
    return out


def _make_rigid(heel_anchor: np.ndarray, toe_anchor: np.ndarray, heel_on: np.ndarray, toe_on: np.ndarray,
                length: float) -> None:
    """Where heel and toe contacts overlap, shifts the anchors of the contact that began later (in
    place, by one constant horizontal offset over its whole run) to one foot length from the
    earlier one, along the line between them, so the flat foot pins both exactly."""
    for h0, h1 in _segments(heel_on):
        for t0, t1 in _segments(toe_on):
            first = max(h0, t0)
            if first >= min(h1, t1):
                continue
            if h0 <= t0:
                fixed, moved, run = heel_anchor[first], toe_anchor, (t0, t1)
            else:
                fixed, moved, run = toe_anchor[first], heel_anchor, (h0, h1)
            direction = normalize((moved[first] - fixed)[0::2])
            moved[run[0]:run[1], 0::2] += fixed[0::2] + direction * length - moved[first, 0::2]


def _spread(values: np.ndarray, locked: np.ndarray, blend: int) -> np.ndarray:
    """Corrections defined on locked frames (F, D), carried into the frames around them so they
    stay continuous: across a gap of up to 2·(blend + 1) frames the correction moves linearly from
    one contact's to the next one's; longer gaps fade out over `blend` frames after a contact and
    in over `blend` frames before the next, and are zero in between."""
    out = np.where(locked[:, None], values, 0.0)
    idx = np.flatnonzero(locked)
    if len(idx) == 0:
        return out
    frames = np.arange(len(locked))
    ramp = blend + 1.0
    before = frames < idx[0]  # leading frames: fade in to the first contact
    out[before] = values[idx[0]] * np.clip(1.0 - (idx[0] - frames[before]) / ramp, 0.0, 1.0)[:, None]
    after = frames > idx[-1]
    out[after] = values[idx[-1]] * np.clip(1.0 - (frames[after] - idx[-1]) / ramp, 0.0, 1.0)[:, None]
    gaps = np.flatnonzero(np.diff(idx) > 1)
    for g in gaps:
        a, b = idx[g], idx[g + 1]
        t = np.arange(a + 1, b)
        if b - a <= 2 * ramp:
            out[t] = values[a] + (values[b] - values[a]) * ((t - a) / (b - a))[:, None]
        else:
            out[t] = (values[a] * np.clip(1.0 - (t - a) / ramp, 0.0, 1.0)[:, None]
                      + values[b] * np.clip(1.0 - (b - t) / ramp, 0.0, 1.0)[:, None])
    return out


def _nearest_locked(locked: np.ndarray) -> np.ndarray:
    """For each frame, the index of the nearest locked frame."""
    idx = np.flatnonzero(locked)
    frames = np.arange(len(locked))
    pos = np.clip(np.searchsorted(idx, frames), 1, len(idx) - 1) if len(idx) > 1 else np.zeros(len(locked), int)
    if len(idx) == 1:
        return np.full(len(locked), idx[0])
    before, after = idx[pos - 1], idx[pos]
    return np.where(np.abs(frames - before) <= np.abs(after - frames), before, after)


def _fade_weights(locked: np.ndarray, blend: int) -> np.ndarray:
    """1 in locked frames, falling linearly to 0 over `blend` frames on either side."""
    distance = np.abs(np.arange(len(locked)) - _nearest_locked(locked)).astype(np.float64)
    return np.clip(1.0 - distance / (blend + 1.0), 0.0, 1.0)


def _two_bone_ik(hip: np.ndarray, knee: np.ndarray, target: np.ndarray, skeleton: Skeleton, side: str,
                 r_thigh: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """New knee positions placing the ankle as close to `target` as the leg allows.

    Returns (knee, reached, residual metres)."""
    l1 = float(np.linalg.norm(skeleton.offsets[JOINT[f"{side}Leg"]]))
    l2 = float(np.linalg.norm(skeleton.offsets[JOINT[f"{side}Foot"]]))
    to_target = target - hip
    distance = np.linalg.norm(to_target, axis=-1)
    reach_max, reach_min = (l1 + l2) * (1.0 - 1e-6), abs(l1 - l2) + 1e-6
    clamped = np.clip(distance, reach_min, reach_max)
    reached = (distance <= reach_max) & (distance >= reach_min)
    direction = normalize(to_target)
    along = (l1 * l1 - l2 * l2 + clamped * clamped) / (2.0 * clamped)
    radius = np.sqrt(np.maximum(l1 * l1 - along * along, 0.0))
    # The knee bends towards the thigh's forward axis (+Z at rest): the solve's twist reference
    # for the thigh is exactly "where the knee points", continuous even for a straight leg, where
    # the knee's own offset from the hip-ankle line is tiny and its direction unstable.
    pole = normalize(reject(r_thigh[..., 2], direction))
    new_knee = hip + along[:, None] * direction + radius[:, None] * pole
    residual = np.abs(distance - clamped)
    return new_knee, reached, residual
