"""The Blender side of an export: `python -m exporter_svc.blender_child SPEC_DIR`.

Runs in a child process (its own process group; see `blender_job.py`), because `bpy` is large,
slow to start, not thread-safe and can hang or crash. It reads `SPEC_DIR/spec.json` and the .npy
arrays it names, builds one armature per person directly from the solved skeleton (rest pose =
the T-pose of `skeleton.py`, bones pointing from each joint to its main child) with an action
keyed on every frame from the solved rotations — no round trip through Blender's BVH importer, so
FBX and GLB carry exactly the solved skeleton — plus a small skinned "stick" mesh per person (one
octahedron per bone, weighted 100 % to it) so the GLB has a glTF skin and viewers show something.
It exports FBX and/or GLB and writes `SPEC_DIR/result.json` with its timings.

Axes: the spec is in BVH body axes (Y up, performer facing +Z, metres). Blender is Z up with
characters facing −Y, so p_blender = K · p_bvh with K = [[1,0,0],[0,0,−1],[0,1,0]] (the inverse of
what Blender's BVH importer and glTF exporter apply, so round trips land back on the same axes).
For a bone with rest matrix B (armature space), the pose-bone rotation that reproduces a solved
local rotation L is B⁻¹ · (K L Kᵀ) · B, as a quaternion conj(m) ⊗ q_L ⊗ m with m = quat(Kᵀ B).

Test-only knob: with MOCAP_EXPORTER_TEST_HANG_BLENDER=1 in its environment the child, after
importing bpy, starts a grandchild that ignores SIGTERM and then sleeps forever — a stand-in for
a Blender that hangs, used by the fault tests to prove the parent kills the whole group.

Exit codes: 0 = success; 2 = bad spec; 3 = export failed (result.json has a one-line reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HANG_ENV = "MOCAP_EXPORTER_TEST_HANG_BLENDER"
SPAWN_TIME_ENV = "MOCAP_EXPORTER_BLENDER_SPAWNED_AT"  # parent's time.time() when it started us
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
SPEC_VERSION = 1
K = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # BVH body axes → Blender axes
_LINEAR = 1  # Keyframe.interpolation enum index of 'LINEAR'


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    if len(argv) != 2:
        print("usage: python -m exporter_svc.blender_child SPEC_DIR", file=sys.stderr)
        return 2
    spec_dir = Path(argv[1])
    timings: dict[str, float] = {}
    try:
        import bpy  # noqa: PLC0415 - the point of this process: import Blender here, not in the service

        timings["import_bpy_s"] = time.perf_counter() - started
        if SPAWN_TIME_ENV in os.environ:  # interpreter start-up included
            timings["startup_s"] = time.time() - float(os.environ[SPAWN_TIME_ENV])
        if os.environ.get(HANG_ENV) == "1":
            _hang()
        spec = json.loads((spec_dir / SPEC_FILE).read_text())
        if spec.get("version") != SPEC_VERSION:
            raise SpecError(f"unsupported spec version {spec.get('version')!r}")
        step = time.perf_counter()
        _build_scene(bpy, spec, spec_dir)
        timings["build_s"] = time.perf_counter() - step
        for kind, exporter in (("fbx", _export_fbx), ("glb", _export_glb)):
            target = spec["outputs"].get(kind)
            if target:
                step = time.perf_counter()
                exporter(bpy, spec_dir / target)
                timings[f"{kind}_s"] = time.perf_counter() - step
    except SpecError as exc:
        _write_result(spec_dir, ok=False, reason=f"bad spec: {exc}", timings=timings)
        return 2
    except Exception as exc:  # noqa: BLE001 - report one line, the traceback goes to stderr
        traceback.print_exc()
        _write_result(spec_dir, ok=False, reason=f"{type(exc).__name__} during Blender export", timings=timings)
        return 3
    timings["total_s"] = time.perf_counter() - started
    _write_result(spec_dir, ok=True, reason="", timings=timings)
    return 0


class SpecError(ValueError):
    """The spec is not what this child understands."""


def _hang() -> None:
    grandchild = [sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"]
    subprocess.Popen(grandchild, stdin=subprocess.DEVNULL)  # noqa: S603 - fixed argv, test-only
    print(f"blender_child: hanging on purpose ({HANG_ENV}=1)", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def _write_result(spec_dir: Path, *, ok: bool, reason: str, timings: dict[str, float]) -> None:
    tmp = spec_dir / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps({"ok": ok, "reason": reason, "timings": timings}))
    os.replace(tmp, spec_dir / RESULT_FILE)


# --- scene ------------------------------------------------------------------------------------

def _build_scene(bpy: Any, spec: dict[str, Any], spec_dir: Path) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    fps = float(spec["fps"])
    scene.render.fps = max(1, int(round(fps)))
    scene.render.fps_base = scene.render.fps / fps
    scene.frame_start = int(spec["frame_start"])
    scene.frame_end = int(spec["frame_end"])
    scene.unit_settings.system = "METRIC"
    scene.unit_settings.scale_length = 1.0
    for person in spec["persons"]:
        armature = _build_armature(bpy, scene, person)
        _build_stick_mesh(bpy, scene, armature, person)
        rotations = np.load(spec_dir / person["rotations"])
        root = np.load(spec_dir / person["root"])
        _animate(bpy, armature, person, rotations, root, int(person["frame_start"]))
    scene.frame_set(scene.frame_start)


def _rest_positions(person: dict[str, Any]) -> np.ndarray:
    """Joint positions in the T-pose standing on the floor, BVH axes."""
    offsets = np.asarray(person["offsets"], dtype=np.float64)
    parents = person["parents"]
    positions = np.zeros_like(offsets)
    positions[0] = offsets[0] + np.array([0.0, float(person["rest_hip_height"]), 0.0])
    for j, parent in enumerate(parents):
        if parent >= 0:
            positions[j] = positions[parent] + offsets[j]
    return positions


def _build_armature(bpy: Any, scene: Any, person: dict[str, Any]) -> Any:
    name = person["name"]
    data = bpy.data.armatures.new(name)
    obj = bpy.data.objects.new(name, data)
    scene.collection.objects.link(obj)
    bpy.context.view_layer.objects.active = obj
    obj.select_set(True)
    positions = _rest_positions(person)
    tails = np.asarray(person["tails"], dtype=np.float64)
    bpy.ops.object.mode_set(mode="EDIT")
    bones = []
    forward, up = K @ np.array([0.0, 0.0, 1.0]), K @ np.array([0.0, 1.0, 0.0])
    for j, joint in enumerate(person["joints"]):
        bone = data.edit_bones.new(joint)
        head, tail = K @ positions[j], K @ (positions[j] + tails[j])
        bone.head, bone.tail = head.tolist(), tail.tolist()
        direction = (tail - head) / np.linalg.norm(tail - head)
        # Roll: the bone's Z axis towards the character's front (up for bones pointing forward).
        bone.align_roll((up if abs(direction @ forward) > 0.7 else forward).tolist())
        parent = person["parents"][j]
        if parent >= 0:
            bone.parent = bones[parent]
            bone.use_connect = False
        bones.append(bone)
    bpy.ops.object.mode_set(mode="OBJECT")
    for pose_bone in obj.pose.bones:
        pose_bone.rotation_mode = "QUATERNION"
    return obj


def _build_stick_mesh(bpy: Any, scene: Any, armature: Any, person: dict[str, Any]) -> None:
    """One octahedron per bone (like Blender's bone display), skinned 100 % to its bone."""
    vertices: list[list[float]] = []
    faces: list[tuple[int, ...]] = []
    groups: list[tuple[str, list[int]]] = []
    for bone in armature.data.bones:
        head, tail = np.array(bone.head_local), np.array(bone.tail_local)
        length = float(np.linalg.norm(tail - head))
        axis = (tail - head) / length
        side = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
        side /= np.linalg.norm(side)
        other = np.cross(axis, side)
        waist, radius = head + 0.15 * length * axis, max(0.08 * length, 0.004)
        base = len(vertices)
        ring = [waist + radius * v for v in (side, other, -side, -other)]
        vertices.extend([head.tolist(), *[p.tolist() for p in ring], tail.tolist()])
        h, t = base, base + 5
        for k in range(4):
            a, b = base + 1 + k, base + 1 + (k + 1) % 4
            faces.append((h, b, a))
            faces.append((t, a, b))
        groups.append((bone.name, list(range(base, base + 6))))
    mesh = bpy.data.meshes.new(f"{armature.name}-bones")
    mesh.from_pydata(vertices, [], faces)
    mesh.update()
    obj = bpy.data.objects.new(f"{armature.name}-bones", mesh)
    scene.collection.objects.link(obj)
    for name, indices in groups:
        obj.vertex_groups.new(name=name).add(indices, 1.0, "REPLACE")
    # Not parented to the armature (which sits at the origin anyway): glTF wants skinned mesh
    # nodes at the root (the validator warns NODE_SKINNED_MESH_NON_ROOT otherwise).
    modifier = obj.modifiers.new("Armature", "ARMATURE")
    modifier.object = armature


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def _animate(bpy: Any, armature: Any, person: dict[str, Any], rotations: np.ndarray, root: np.ndarray,
             frame_start: int) -> None:
    """Keys every frame: pose-bone quaternions for all bones, location for the root."""
    frames = rotations.shape[0]
    if rotations.shape != (frames, len(person["joints"]), 4) or root.shape != (frames, 3):
        raise SpecError("rotation or root arrays do not match the skeleton")
    action = bpy.data.actions.new(f"{armature.name}-action")
    slot = action.slots.new(id_type="OBJECT", name=armature.name)
    strip = action.layers.new("Layer").strips.new(type="KEYFRAME")
    channelbag = strip.channelbag(slot, ensure=True)
    times = np.arange(frame_start, frame_start + frames, dtype=np.float64)
    rest_head = K @ _rest_positions(person)[0]
    for j, joint in enumerate(person["joints"]):
        bone = armature.data.bones[joint]
        rest = np.array(bone.matrix_local.to_3x3())
        m = np.array((_mathutils().Matrix((K.T @ rest).tolist())).to_quaternion())
        conj_m = m * np.array([1.0, -1.0, -1.0, -1.0])
        basis = _quat_mul(_quat_mul(conj_m, rotations[:, j]), m)
        for index in range(4):
            _key(channelbag, f'pose.bones["{joint}"].rotation_quaternion', index, joint, times, basis[:, index])
        if person["parents"][j] < 0:
            location = (rest.T @ ((root @ K.T) - rest_head).T).T
            for index in range(3):
                _key(channelbag, f'pose.bones["{joint}"].location', index, joint, times, location[:, index])
    armature.animation_data_create()
    armature.animation_data.action = action
    armature.animation_data.action_slot = slot


def _key(channelbag: Any, path: str, index: int, group: str, times: np.ndarray, values: np.ndarray) -> None:
    curve = channelbag.fcurves.new(path, index=index, group_name=group)
    points = curve.keyframe_points
    points.add(len(times))
    points.foreach_set("co", np.stack([times, values], axis=-1).ravel().tolist())
    points.foreach_set("interpolation", [_LINEAR] * len(times))
    curve.update()


def _mathutils() -> Any:
    import mathutils  # noqa: PLC0415 - ships with bpy

    return mathutils


# --- exports ----------------------------------------------------------------------------------

def _export_fbx(bpy: Any, path: Path) -> None:
    # Game-engine friendly: no leaf bones, every frame baked, nothing simplified, Y-up, cm scale.
    bpy.ops.export_scene.fbx(
        filepath=str(path), use_selection=False, object_types={"ARMATURE", "MESH"},
        add_leaf_bones=False, bake_anim=True, bake_anim_use_all_bones=True,
        bake_anim_use_nla_strips=False, bake_anim_use_all_actions=False,
        bake_anim_force_startend_keying=True, bake_anim_step=1.0, bake_anim_simplify_factor=0.0,
        primary_bone_axis="Y", secondary_bone_axis="X", axis_forward="-Z", axis_up="Y",
        apply_unit_scale=True, apply_scale_options="FBX_SCALE_NONE", use_armature_deform_only=False,
        mesh_smooth_type="OFF", embed_textures=False, path_mode="AUTO",
    )


def _export_glb(bpy: Any, path: Path) -> None:
    bpy.ops.export_scene.gltf(
        filepath=str(path), export_format="GLB", use_selection=False, export_yup=True,
        export_animations=True, export_animation_mode="ACTIVE_ACTIONS", export_force_sampling=False,
        export_frame_range=False, export_anim_slide_to_zero=False, export_optimize_animation_size=False,
        export_skins=True, export_def_bones=False, export_leaf_bone=False, export_materials="NONE",
        export_cameras=False, export_lights=False, export_apply=False,
    )


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip Blender's atexit teardown (~0.3 s): every file is written and closed by now.
    os._exit(code)
