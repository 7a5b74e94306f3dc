"""Re-imports an animation file with Blender's own importers and dumps joint world positions.

Run in a child process (tests never import bpy themselves):
    python tests/exporter/blender_probe.py {bvh|fbx|glb} INPUT OUT.npz --fps 30
OUT.npz holds, per armature found (sorted by object name): `<armature>/names` (bone names),
`<armature>/heads` (F, J, 3) and `<armature>/tails` (F, J, 3) world positions in Blender axes
(Z up, metres) for every frame of the imported scene range, `<armature>/turns` (F, J, 3, 3): each
bone's world rotation relative to its own rest (posed · restᵀ, independent of which bone axes an
importer picks), and `frames` (F,).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("bvh", "fbx", "glb"))
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--fps", type=float, required=True)
    args = parser.parse_args(argv)

    import bpy  # noqa: PLC0415

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.fps = max(1, int(round(args.fps)))
    scene.render.fps_base = scene.render.fps / args.fps
    scene.frame_start = 0
    if args.kind == "bvh":
        # BVH is written in centimetres: scale 0.01 gives metres. Default axes: BVH Y-up → Blender Z-up.
        # BVH has no start time and Blender keys its first frame at frame 1 at the earliest: the
        # dump's frame 0 is taken from Blender's frame 1 (see `frame_shift`).
        bpy.ops.import_anim.bvh(filepath=args.input, global_scale=0.01, rotate_mode="NATIVE",
                                update_scene_fps=False, update_scene_duration=True, frame_start=1)
    elif args.kind == "fbx":
        # anim_offset 0: the take's time 0 lands on frame 0, i.e. the exporter's timeline.
        bpy.ops.import_scene.fbx(filepath=args.input, anim_offset=0.0)
    else:
        bpy.ops.import_scene.gltf(filepath=args.input)
    armatures = sorted((o for o in scene.objects if o.type == "ARMATURE"), key=lambda o: o.name)
    frame_shift = 1 if args.kind == "bvh" else 0
    # Not every importer sets the scene range (glTF does not): cover every imported action.
    ranges = [a.frame_range for a in bpy.data.actions]
    first = int(np.floor(min(r[0] for r in ranges))) if ranges else scene.frame_start
    last = int(np.ceil(max(r[1] for r in ranges))) if ranges else scene.frame_end
    frames = np.arange(first, last + 1)
    out: dict[str, np.ndarray] = {"frames": frames - frame_shift}
    heads = {o.name: np.zeros((len(frames), len(o.pose.bones), 3)) for o in armatures}
    tails = {o.name: np.zeros((len(frames), len(o.pose.bones), 3)) for o in armatures}
    turns = {o.name: np.zeros((len(frames), len(o.pose.bones), 3, 3)) for o in armatures}
    rests = {o.name: [_rotation(np.array(o.matrix_world) @ np.array(b.bone.matrix_local)) for b in o.pose.bones]
             for o in armatures}
    for i, frame in enumerate(frames):
        scene.frame_set(int(frame))

        for o in armatures:
            world = np.array(o.matrix_world)
            for j, bone in enumerate(o.pose.bones):
                heads[o.name][i, j] = (world @ np.append(np.array(bone.head), 1.0))[:3]
                tails[o.name][i, j] = (world @ np.append(np.array(bone.tail), 1.0))[:3]
                turns[o.name][i, j] = _rotation(world @ np.array(bone.matrix)) @ rests[o.name][j].T
    for o in armatures:
        out[f"{o.name}/names"] = np.array([b.name for b in o.pose.bones])
        out[f"{o.name}/heads"] = heads[o.name]
        out[f"{o.name}/tails"] = tails[o.name]
        out[f"{o.name}/turns"] = turns[o.name]
    np.savez(args.output, **out)
    print("armatures:", [o.name for o in armatures], "frames:", len(frames), file=sys.stderr)
    return 0


def _rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation part of a 4×4 (columns normalised: importers may scale bones)."""
    m = matrix[:3, :3]
    return m / np.linalg.norm(m, axis=0, keepdims=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
