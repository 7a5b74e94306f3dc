"""From 33 landmarks per frame to the armature of `skeleton.py`: bone lengths, joint rotations,
root motion, ground plane and foot locking.

Method (per take, all frames at once, vectorised over frames):

1. Axes. Landmarks come in camera axes (x right, y down, z away from the camera), hip-centred,
   plus an optional root trajectory (the hip centre's path, same axes). Both are turned into the
   BVH body axes by a 180° rotation about x, `BODY_FROM_CAMERA = diag(1, −1, −1)`: y up, and a
   performer facing the camera faces +Z with their left on +X.
2. Ground. `feet.estimate_ground` fits the floor to the lowest foot points and levels it to y = 0
   (this also removes a tilted camera's pitch and roll).
3. Bone lengths. One length per bone for the take: the median over confident frames (both end
   landmarks with visibility ≥ 0.5), left and right averaged, so the armature never stretches and
   is symmetric. Foot shape (heel and toe tip in the foot's own frame) the same way.
4. Rotations. Joints are visited parent first. Each bone is aimed from its joint's position as
   forward kinematics has already placed it (not from its landmark) at the landmark of its child,
   so an error in one bone's length never tilts the bones below it. The twist about the bone comes
   from a reference vector: the hip line (Hips), hip line blended into the shoulder line along the
   spine (Spine, Spine1, Spine2), the chest's forward axis (shoulders), the plane the limb bends
   in (upper arm: the forearm; thigh and shin: each other) falling back smoothly to the parent's
   own axis (arms) or the foot's direction (legs) as the limb straightens, the hand's across
   vector index − pinky (forearm, hand), the face's forward vector (neck, head). Feet take their
   whole orientation from heel, ankle and toe tip. Local rotation = parent⁻¹ · global.
5. Root motion. PATH keeps the hip centre's trajectory (a given one as is; one estimated from the
   image is first made consistent with the standing feet, `rootpath.refine_path_with_feet`);
   IN_PLACE keeps only its height (foot locking still runs in path space, then the horizontal
   path is removed).
6. Contacts and foot locking: `feet.py`.

Continuity: rotations are kept as matrices here; quaternion signs and Euler branches are made
continuous where they are written (`rotations.quat_continuous`, `rotations.euler_zxy_continuous`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter_svc import feet
from exporter_svc.rootpath import refine_path_with_feet
from exporter_svc.rotations import normalize, reject, rotation_between_frames
from exporter_svc.skeleton import (
    END_SITE_NAMES,
    JOINT,
    JOINT_NAMES,
    BodyMeasures,
    Motion,
    Pose,
    Skeleton,
    build_skeleton,
    forward_kinematics,
)
from mocap_common.errors import FailedPrecondition

BODY_FROM_CAMERA = np.diag([1.0, -1.0, -1.0])
VISIBLE = 0.5  # a landmark counts as seen at this visibility
MIN_CONFIDENT_FRAMES = 5
# Below this bend (sine of the angle between a limb's two bones) the bend plane is too noisy to
# give the twist: blend to the fallback reference.
STRAIGHT_LIMB_SIN = np.sin(np.radians(25.0))

_X, _Y, _Z = np.eye(3)
# Spine twist: fraction of the way from the hip line to the shoulder line for Spine, Spine1, Spine2.
_SPINE_TWIST = {"Spine": 1.0 / 3.0, "Spine1": 2.0 / 3.0, "Spine2": 1.0}


class Unsolvable(FailedPrecondition):
    """Too few confident frames to measure the skeleton."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="UNSOLVABLE")


@dataclass
class TakeInput:
    """One person's landmarks on a constant-rate timeline (see `timeline.py`)."""

    world: np.ndarray  # (F, 33, 3) metres, camera axes, relative to the hip centre
    visibility: np.ndarray  # (F, 33) in [0, 1]
    root: np.ndarray | None = None  # (F, 3) hip centre's path, camera axes; None = unknown
    root_is_estimate: bool = False  # True: the path came from the image (rootpath.py) and is refined with the feet

    @property
    def frame_count(self) -> int:
        return self.world.shape[0]


@dataclass(frozen=True)
class SolveOptions:
    fps: float
    in_place: bool = False
    foot_locking: bool = True


@dataclass
class SolvedTake:
    """A solved take. `motion` is in path space (the hips follow the performer's path); the
    animation written to files is `export_motion()`, which honours IN_PLACE."""

    skeleton: Skeleton
    motion: Motion
    fps: float
    in_place: bool
    landmarks: np.ndarray  # (F, 33, 3) the input in body axes on the levelled floor, metres
    contacts: feet.Contacts
    unlocked_skate_m: float  # foot skate during contact before locking
    skate_m: float  # foot skate during contact of `motion`
    lock_report: feet.LockReport | None
    ground: feet.Ground

    def pose(self) -> Pose:
        return forward_kinematics(self.skeleton, self.motion)

    def export_motion(self) -> Motion:
        if not self.in_place:
            return self.motion
        root = self.motion.root_positions.copy()
        root[:, [0, 2]] = 0.0
        return Motion(root_positions=root, local_rotations=self.motion.local_rotations)


def solve_take(take: TakeInput, options: SolveOptions) -> SolvedTake:
    """Solves one person's take (see the module docstring for the method)."""
    if take.frame_count < 1:
        raise Unsolvable("the track has no frames")
    if not np.all(np.isfinite(take.world)) or (take.root is not None and not np.all(np.isfinite(take.root))):
        raise Unsolvable("the track's landmarks contain NaN or infinite values")
    global_cam = take.world.astype(np.float64)
    if take.root is not None:
        global_cam = global_cam + take.root[:, None, :]
    body = global_cam @ BODY_FROM_CAMERA.T
    ground = feet.estimate_ground(body)
    body = ground.apply(body)
    if take.root is not None and take.root_is_estimate:
        body, _ = refine_path_with_feet(body, options.fps)
    measures = measure_body(body, take.visibility >= VISIBLE)
    skeleton = build_skeleton(measures)
    motion = solve_rotations(skeleton, body)
    contacts = feet.detect_contacts(skeleton, motion, options.fps)
    unlocked_skate = feet.foot_skate(feet.contact_point_positions(skeleton, motion), contacts.mask)
    skate, lock_report = unlocked_skate, None
    if options.foot_locking and contacts.any_contact():
        motion, lock_report = feet.lock_feet(skeleton, motion, contacts, options.fps)
        skate = feet.foot_skate(feet.contact_point_positions(skeleton, motion), contacts.mask)
    return SolvedTake(skeleton=skeleton, motion=motion, fps=options.fps, in_place=options.in_place,
                      landmarks=body, contacts=contacts, unlocked_skate_m=unlocked_skate, skate_m=skate,
                      lock_report=lock_report, ground=ground)


# --- landmarks → named points ---------------------------------------------------------------

def _mid(p: np.ndarray, a: int, b: int) -> np.ndarray:
    return 0.5 * (p[:, a] + p[:, b])


def landmark_targets(p: np.ndarray) -> dict[str, np.ndarray]:
    """Where each joint (and End Site) should be, from landmarks (F, 33, 3)."""
    t = {
        "Hips": _mid(p, 23, 24),
        "LeftUpLeg": p[:, 23], "RightUpLeg": p[:, 24],
        "LeftLeg": p[:, 25], "RightLeg": p[:, 26],
        "LeftFoot": p[:, 27], "RightFoot": p[:, 28],
        "LeftToe_End": p[:, 31], "RightToe_End": p[:, 32],
        "Neck": _mid(p, 11, 12),
        "Head": _mid(p, 7, 8),
        "LeftArm": p[:, 11], "RightArm": p[:, 12],
        "LeftForeArm": p[:, 13], "RightForeArm": p[:, 14],
        "LeftHand": p[:, 15], "RightHand": p[:, 16],
        "LeftHand_End": _mid(p, 17, 19), "RightHand_End": _mid(p, 18, 20),
    }
    return t


def foot_frames(p: np.ndarray, side: str) -> np.ndarray:
    """(F, 3, 3) foot orientation from ankle, heel and toe tip: columns lateral (+X at rest),
    up (+Y), toes (+Z)."""
    ankle, heel, toe = (p[:, i] for i in ((27, 29, 31) if side == "Left" else (28, 30, 32)))
    forward = normalize(toe - heel)
    up = normalize(reject(ankle - heel, forward))
    lateral = np.cross(up, forward)
    return np.stack([lateral, up, forward], axis=-1)


# --- bone lengths ---------------------------------------------------------------------------

def _robust_length(vectors: np.ndarray, mask: np.ndarray) -> float:
    lengths = np.linalg.norm(vectors, axis=-1)
    chosen = lengths[mask] if np.count_nonzero(mask) >= MIN_CONFIDENT_FRAMES else lengths
    return float(np.median(chosen))


def _pair_mask(confident: np.ndarray, *landmarks: int) -> np.ndarray:
    return np.all(confident[:, landmarks], axis=1)


def measure_body(p: np.ndarray, confident: np.ndarray) -> BodyMeasures:
    """One length per bone (median over confident frames, left/right averaged)."""
    core = (11, 12, 23, 24)
    if not np.any(_pair_mask(confident, *core)):
        raise Unsolvable("no frame shows both shoulders and both hips with visibility ≥ 0.5")

    def sym(left: tuple[int, int], right: tuple[int, int]) -> float:
        a = _robust_length(p[:, left[1]] - p[:, left[0]], _pair_mask(confident, *left))
        b = _robust_length(p[:, right[1]] - p[:, right[0]], _pair_mask(confident, *right))
        return 0.5 * (a + b)

    mid_hip, mid_shoulder, mid_ear = _mid(p, 23, 24), _mid(p, 11, 12), _mid(p, 7, 8)
    hand_l, hand_r = _mid(p, 17, 19) - p[:, 15], _mid(p, 18, 20) - p[:, 16]
    hand = 0.5 * (_robust_length(hand_l, _pair_mask(confident, 15, 17, 19))
                  + _robust_length(hand_r, _pair_mask(confident, 16, 18, 20)))
    heel, toe = _foot_shape(p, confident)
    return BodyMeasures(
        hip_width=_robust_length(p[:, 23] - p[:, 24], _pair_mask(confident, 23, 24)),
        thigh=sym((23, 25), (24, 26)),
        shin=sym((25, 27), (26, 28)),
        trunk=_robust_length(mid_shoulder - mid_hip, _pair_mask(confident, *core)),
        shoulder_width=_robust_length(p[:, 11] - p[:, 12], _pair_mask(confident, 11, 12)),
        upper_arm=sym((11, 13), (12, 14)),
        forearm=sym((13, 15), (14, 16)),
        hand=hand,
        neck=_robust_length(mid_ear - mid_shoulder, _pair_mask(confident, 7, 8, 11, 12)),
        ear_width=_robust_length(p[:, 7] - p[:, 8], _pair_mask(confident, 7, 8)),
        heel=heel,
        toe=toe,
    )


def _foot_shape(p: np.ndarray, confident: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Median heel and toe tip relative to the ankle in the (left) foot frame, sides mirrored."""
    heels, toes = [], []
    for side, (ankle, heel, toe) in (("Left", (27, 29, 31)), ("Right", (28, 30, 32))):
        frames = foot_frames(p, side)
        mask = _pair_mask(confident, ankle, heel, toe)
        if np.count_nonzero(mask) < MIN_CONFIDENT_FRAMES:
            mask = np.ones(len(p), bool)
        to_local = np.swapaxes(frames[mask], -1, -2)
        h = np.median((to_local @ (p[mask, heel] - p[mask, ankle])[..., None])[..., 0], axis=0)
        t = np.median((to_local @ (p[mask, toe] - p[mask, ankle])[..., None])[..., 0], axis=0)
        mirror = np.array([1.0 if side == "Left" else -1.0, 1.0, 1.0])
        heels.append(h * mirror)
        toes.append(t * mirror)
    heel, toe = 0.5 * (heels[0] + heels[1]), 0.5 * (toes[0] + toes[1])
    return tuple(float(v) for v in heel), tuple(float(v) for v in toe)  # type: ignore[return-value]


# --- rotations ------------------------------------------------------------------------------

def _twist_reference(primary: np.ndarray, candidate: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """A twist reference ⊥ `primary`: `candidate` where it is well defined (its part ⊥ primary is
    at least STRAIGHT_LIMB_SIN of it), blending smoothly into `fallback` as it degenerates."""
    p = normalize(primary)
    c = reject(normalize(candidate), p)
    strength = np.linalg.norm(c, axis=-1, keepdims=True)
    w = np.clip(strength / STRAIGHT_LIMB_SIN, 0.0, 1.0)
    w = w * w * (3.0 - 2.0 * w)  # smoothstep: no kink where the blend starts
    f = normalize(reject(fallback, p))
    return w * normalize(c) + (1.0 - w) * f


def solve_rotations(skeleton: Skeleton, p: np.ndarray) -> Motion:
    """Global rotations joint by joint (parents first), then local = parent⁻¹ · global."""
    frames, count = p.shape[0], skeleton.joint_count
    t = landmark_targets(p)
    positions = np.zeros((frames, count, 3))
    rotations = np.zeros((frames, count, 3, 3))
    hip_line = p[:, 23] - p[:, 24]
    shoulder_line = p[:, 11] - p[:, 12]
    face_forward = p[:, 0] - t["Head"]
    ear_line = p[:, 7] - p[:, 8]

    def aim(name: str, target: np.ndarray, rest_secondary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
        j = JOINT[name]
        rest_dir = skeleton.bone_tail(j)
        return rotation_between_frames(rest_dir, rest_secondary, target - positions[:, j], secondary)

    for j, name in enumerate(JOINT_NAMES):
        parent = skeleton.parents[j]
        if parent < 0:
            positions[:, j] = t["Hips"]
        else:
            positions[:, j] = positions[:, parent] + rotations[:, parent] @ skeleton.offsets[j]
        parent_rot = rotations[:, parent] if parent >= 0 else None
        side = "Left" if name.startswith("Left") else "Right"
        if name == "Hips":
            rot = rotation_between_frames(_X, _Y, hip_line, t["Neck"] - t["Hips"])
        elif name in _SPINE_TWIST:
            w = _SPINE_TWIST[name]
            lateral = (1.0 - w) * normalize(hip_line) + w * normalize(shoulder_line)
            rot = aim(name, t["Neck"], _X, lateral)
        elif name == "Neck":
            rot = aim(name, t["Head"], _Z, face_forward)
        elif name == "Head":
            rot = rotation_between_frames(_X, _Z, ear_line, face_forward)
        elif name.endswith("Shoulder"):
            rot = aim(name, t[f"{side}Arm"], _Z, parent_rot[..., 2])
        elif name.endswith("Arm") and not name.endswith("ForeArm"):
            forearm = t[f"{side}Hand"] - t[f"{side}ForeArm"]
            upper = t[f"{side}ForeArm"] - positions[:, j]
            ref = _twist_reference(upper, forearm, parent_rot[..., 2])
            rot = aim(name, t[f"{side}ForeArm"], _Z, ref)
        elif name.endswith("ForeArm") or name.endswith("Hand"):
            a, b = (17, 19) if side == "Left" else (18, 20)
            across = p[:, b] - p[:, a]  # index − pinky: towards the thumb
            target = t[f"{side}Hand"] if name.endswith("ForeArm") else t[f"{side}Hand_End"]
            ref = _twist_reference(target - positions[:, j], across, parent_rot[..., 2])
            rot = aim(name, target, _Z, ref)
        elif name.endswith("Leg"):  # UpLeg (thigh) and Leg (shin)
            heel, toe = (29, 31) if side == "Left" else (30, 32)
            foot_forward = p[:, toe] - p[:, heel]
            thigh = t[f"{side}Leg"] - t[f"{side}UpLeg"]
            shin = t[f"{side}Foot"] - t[f"{side}Leg"]
            if name.endswith("UpLeg"):
                # The knee's forward axis: away from where the shin folds.
                ref = _twist_reference(t[f"{side}Leg"] - positions[:, j], -shin, foot_forward)
                rot = aim(name, t[f"{side}Leg"], _Z, ref)
            else:
                ref = _twist_reference(t[f"{side}Foot"] - positions[:, j], thigh, foot_forward)
                rot = aim(name, t[f"{side}Foot"], _Z, ref)
        elif name.endswith("Foot"):
            rot = foot_frames(p, side)
        elif name.endswith("ToeBase"):
            rot = parent_rot  # toes do not bend in BlazePose: identity local rotation
        else:  # pragma: no cover - every joint has a rule
            raise AssertionError(f"no rotation rule for {name}")
        rotations[:, j] = rot
    local = np.empty_like(rotations)
    for j, parent in enumerate(skeleton.parents):
        local[:, j] = rotations[:, j] if parent < 0 else np.swapaxes(rotations[:, parent], -1, -2) @ rotations[:, j]
    return Motion(root_positions=positions[:, JOINT["Hips"]].copy(), local_rotations=local)


def solve_errors(take: SolvedTake) -> dict[str, np.ndarray]:
    """Per target: distance (F,) in metres between the solved skeleton's forward kinematics (path
    space) and the landmark-derived position it was solved towards."""
    pose = take.pose()
    errors = {}
    for name, target in landmark_targets(take.landmarks).items():
        if name in JOINT:
            solved = pose.positions[:, JOINT[name]]
        else:
            owner = next(j for j, end in END_SITE_NAMES.items() if end == name)
            solved = pose.end_sites[JOINT[owner]]
        errors[name] = np.linalg.norm(solved - target, axis=-1)
    return errors
