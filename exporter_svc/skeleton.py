"""The humanoid armature every export uses: joint names, hierarchy and rest pose.

Names follow Mixamo (without the `mixamorig:` prefix), which Unity's and Unreal's humanoid
mappers, Blender add-ons and MotionBuilder recognise without a manual mapping:

    Hips (root: 3 position + 3 rotation channels)
    ├── LeftUpLeg → LeftLeg → LeftFoot → LeftToeBase → [LeftToe_End]
    ├── RightUpLeg → RightLeg → RightFoot → RightToeBase → [RightToe_End]
    └── Spine → Spine1 → Spine2
                         ├── Neck → Head → [HeadTop_End]
                         ├── LeftShoulder → LeftArm → LeftForeArm → LeftHand → [LeftHand_End]
                         └── RightShoulder → RightArm → RightForeArm → RightHand → [RightHand_End]

Where each joint sits, in terms of BlazePose's 33 landmarks:
Hips = mid-hip; Left/RightUpLeg = hips 23/24; Left/RightLeg = knees 25/26; Left/RightFoot = ankles
27/28; toe end = foot index 31/32; ToeBase = the ball of the foot, 72 % of the way from heel 29/30
to toe (it carries no rotation of its own: BlazePose does not see the toes bend); Spine, Spine1,
Spine2 = 12 %, 41 %, 70 % of the way from mid-hip to mid-shoulder; Neck and the two Shoulder
(clavicle) joints = mid-shoulder; Left/RightArm = shoulders 11/12; Left/RightForeArm = elbows
13/14; Left/RightHand = wrists 15/16; hand end = midpoint of index and pinky (19+17, 20+18);
Head = midpoint of the ears 7/8; HeadTop_End sits 0.9 ear-widths above the Head.

Axes and rest pose (BVH convention): metres in this module, Y up, the performer faces +Z, and
the performer's left is +X (right-handed). The rest pose is a T-pose with every joint rotation
the identity: legs straight down, spine and neck straight up, arms along ±X with palms down
(thumbs towards +Z), feet flat pointing +Z. Offsets are in the parent's frame, which at rest is
the world frame, so a rest offset is also the bone's direction in the T-pose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Fractions of the mid-hip → mid-shoulder distance at which Spine, Spine1, Spine2 and the Neck sit.
SPINE_FRACTIONS = (0.12, 0.29, 0.29, 0.30)
TOE_BALL_FRACTION = 0.72  # ball of the foot along heel → toe tip
HEAD_TOP_PER_EAR_WIDTH = 0.9

JOINT_NAMES: tuple[str, ...] = (
    "Hips",
    "LeftUpLeg", "LeftLeg", "LeftFoot", "LeftToeBase",
    "RightUpLeg", "RightLeg", "RightFoot", "RightToeBase",
    "Spine", "Spine1", "Spine2",
    "Neck", "Head",
    "LeftShoulder", "LeftArm", "LeftForeArm", "LeftHand",
    "RightShoulder", "RightArm", "RightForeArm", "RightHand",
)
PARENT_NAMES: dict[str, str | None] = {
    "Hips": None,
    "LeftUpLeg": "Hips", "LeftLeg": "LeftUpLeg", "LeftFoot": "LeftLeg", "LeftToeBase": "LeftFoot",
    "RightUpLeg": "Hips", "RightLeg": "RightUpLeg", "RightFoot": "RightLeg", "RightToeBase": "RightFoot",
    "Spine": "Hips", "Spine1": "Spine", "Spine2": "Spine1",
    "Neck": "Spine2", "Head": "Neck",
    "LeftShoulder": "Spine2", "LeftArm": "LeftShoulder", "LeftForeArm": "LeftArm", "LeftHand": "LeftForeArm",
    "RightShoulder": "Spine2", "RightArm": "RightShoulder", "RightForeArm": "RightArm", "RightHand": "RightForeArm",
}
END_SITE_NAMES: dict[str, str] = {
    "LeftToeBase": "LeftToe_End", "RightToeBase": "RightToe_End", "Head": "HeadTop_End",
    "LeftHand": "LeftHand_End", "RightHand": "RightHand_End",
}
# The child a bone points at (its tail in Blender); joints without one point at their End Site.
MAIN_CHILD: dict[str, str] = {
    "Hips": "Spine", "LeftUpLeg": "LeftLeg", "LeftLeg": "LeftFoot", "LeftFoot": "LeftToeBase",
    "RightUpLeg": "RightLeg", "RightLeg": "RightFoot", "RightFoot": "RightToeBase",
    "Spine": "Spine1", "Spine1": "Spine2", "Spine2": "Neck", "Neck": "Head",
    "LeftShoulder": "LeftArm", "LeftArm": "LeftForeArm", "LeftForeArm": "LeftHand",
    "RightShoulder": "RightArm", "RightArm": "RightForeArm", "RightForeArm": "RightHand",
}

JOINT = {name: i for i, name in enumerate(JOINT_NAMES)}
PARENTS: tuple[int, ...] = tuple(-1 if PARENT_NAMES[n] is None else JOINT[PARENT_NAMES[n]] for n in JOINT_NAMES)


@dataclass(frozen=True)
class BodyMeasures:
    """One length per bone for the whole take (metres), left/right symmetric.

    Foot points are in the foot's own frame (x lateral towards the performer's left for the left
    foot — mirrored for the right —, y up, z towards the toes), relative to the ankle.
    """

    hip_width: float
    thigh: float
    shin: float
    trunk: float  # mid-hip → mid-shoulder
    shoulder_width: float
    upper_arm: float
    forearm: float
    hand: float  # wrist → midpoint of index and pinky
    neck: float  # mid-shoulder → mid-ear
    ear_width: float
    heel: tuple[float, float, float]  # left foot frame
    toe: tuple[float, float, float]  # left foot frame

    def foot_point(self, point: str, side: str) -> np.ndarray:
        """Heel or toe tip relative to the ankle in the foot frame of `side` ("Left"/"Right")."""
        value = np.array(self.heel if point == "heel" else self.toe, dtype=np.float64)
        if side == "Right":
            value[0] = -value[0]
        return value

    def ball(self, side: str) -> np.ndarray:
        heel, toe = self.foot_point("heel", side), self.foot_point("toe", side)
        return heel + TOE_BALL_FRACTION * (toe - heel)


@dataclass
class Skeleton:
    """Hierarchy plus rest offsets (metres, BVH axes) of one person's armature."""

    measures: BodyMeasures
    names: tuple[str, ...] = JOINT_NAMES
    parents: tuple[int, ...] = PARENTS
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((len(JOINT_NAMES), 3)))
    end_sites: dict[int, np.ndarray] = field(default_factory=dict)  # joint index → offset

    @property
    def joint_count(self) -> int:
        return len(self.names)

    def children(self, joint: int) -> list[int]:
        return [j for j, p in enumerate(self.parents) if p == joint]

    def rest_positions(self) -> np.ndarray:
        """(J, 3) joint positions in the T-pose with the Hips at the origin."""
        positions = np.zeros((self.joint_count, 3))
        for j, parent in enumerate(self.parents):
            if parent >= 0:
                positions[j] = positions[parent] + self.offsets[j]
        return positions

    def rest_hip_height(self) -> float:
        """Height of the Hips above the floor in the T-pose (soles on the floor)."""
        m = self.measures
        sole = min(m.heel[1], m.toe[1])
        return m.thigh + m.shin - sole

    def bone_tail(self, joint: int) -> np.ndarray:
        """Offset from the joint to the point its bone points at (main child or End Site)."""
        name = self.names[joint]
        if name in MAIN_CHILD:
            return self.offsets[JOINT[MAIN_CHILD[name]]]
        return self.end_sites[joint]


def build_skeleton(m: BodyMeasures) -> Skeleton:
    """The T-pose armature for the given body measures."""
    offsets = np.zeros((len(JOINT_NAMES), 3))

    def put(name: str, value: np.ndarray | tuple[float, float, float]) -> None:
        offsets[JOINT[name]] = value

    for side, sign in (("Left", 1.0), ("Right", -1.0)):
        put(f"{side}UpLeg", (sign * m.hip_width / 2, 0.0, 0.0))
        put(f"{side}Leg", (0.0, -m.thigh, 0.0))
        put(f"{side}Foot", (0.0, -m.shin, 0.0))
        put(f"{side}ToeBase", m.ball(side))
        put(f"{side}Shoulder", (0.0, SPINE_FRACTIONS[3] * m.trunk, 0.0))
        put(f"{side}Arm", (sign * m.shoulder_width / 2, 0.0, 0.0))
        put(f"{side}ForeArm", (sign * m.upper_arm, 0.0, 0.0))
        put(f"{side}Hand", (sign * m.forearm, 0.0, 0.0))
    put("Spine", (0.0, SPINE_FRACTIONS[0] * m.trunk, 0.0))
    put("Spine1", (0.0, SPINE_FRACTIONS[1] * m.trunk, 0.0))
    put("Spine2", (0.0, SPINE_FRACTIONS[2] * m.trunk, 0.0))
    put("Neck", (0.0, SPINE_FRACTIONS[3] * m.trunk, 0.0))
    put("Head", (0.0, m.neck, 0.0))
    end_sites = {
        JOINT["LeftToeBase"]: m.foot_point("toe", "Left") - m.ball("Left"),
        JOINT["RightToeBase"]: m.foot_point("toe", "Right") - m.ball("Right"),
        JOINT["Head"]: np.array([0.0, HEAD_TOP_PER_EAR_WIDTH * m.ear_width, 0.0]),
        JOINT["LeftHand"]: np.array([m.hand, 0.0, 0.0]),
        JOINT["RightHand"]: np.array([-m.hand, 0.0, 0.0]),
    }
    return Skeleton(measures=m, offsets=offsets, end_sites=end_sites)


@dataclass
class Motion:
    """An animation of a skeleton: root positions and local joint rotations per frame."""

    root_positions: np.ndarray  # (F, 3) metres, BVH axes
    local_rotations: np.ndarray  # (F, J, 3, 3) joint rotation relative to the parent

    @property
    def frame_count(self) -> int:
        return self.root_positions.shape[0]


@dataclass
class Pose:
    positions: np.ndarray  # (F, J, 3)
    rotations: np.ndarray  # (F, J, 3, 3) global
    end_sites: dict[int, np.ndarray]  # joint → (F, 3)


def forward_kinematics(skeleton: Skeleton, motion: Motion) -> Pose:
    """Global joint positions and rotations of `motion` on `skeleton` (the BVH semantics)."""
    frames, count = motion.frame_count, skeleton.joint_count
    positions = np.zeros((frames, count, 3))
    rotations = np.zeros((frames, count, 3, 3))
    for j, parent in enumerate(skeleton.parents):
        local = motion.local_rotations[:, j]
        if parent < 0:
            positions[:, j] = motion.root_positions + skeleton.offsets[j]
            rotations[:, j] = local
        else:
            positions[:, j] = positions[:, parent] + rotations[:, parent] @ skeleton.offsets[j]
            rotations[:, j] = rotations[:, parent] @ local
    end_sites = {j: positions[:, j] + rotations[:, j] @ off for j, off in skeleton.end_sites.items()}
    return Pose(positions=positions, rotations=rotations, end_sites=end_sites)
