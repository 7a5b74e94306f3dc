"""Checks what `make demo` left in its output directory, with readers independent of the mesh.

    python -m tests.e2e.verify_demo OUT_DIR

`.ci/run` runs `make demo` in a fresh clone with default settings and then this: the six files of
the README must be there, the BVH must parse (PyPI `bvh`), the FBX and GLB must load in Blender
with one armature each, the GLB must pass the Khronos glTF validator, the preview must decode and
the quality report must name one tracked person. Exits 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import av
from bvh import Bvh

from tests.exporter.conftest import blender_probe, validate_gltf

STEM = "runner_1080p"
EXPECTED = sorted([f"{STEM}-person-1.bvh", f"{STEM}.fbx", f"{STEM}.glb", f"{STEM}-preview.mp4",
                   f"{STEM}-quality.json", f"{STEM}-tracks.pb"])
FPS = 30.0


def check(out: Path) -> list[str]:
    """Every failed check, as a sentence; empty when the demo's output is complete and valid."""
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present != EXPECTED:
        return [f"{out} holds {present}, expected {EXPECTED}"]
    problems = []
    bvh = Bvh((out / f"{STEM}-person-1.bvh").read_text())
    if bvh.nframes < 175 or "Hips" not in bvh.get_joints_names():
        problems.append(f"BVH: {bvh.nframes} frames, joints {bvh.get_joints_names()[:3]}...")
    with tempfile.TemporaryDirectory() as scratch:
        for kind in ("fbx", "glb"):
            armatures = blender_probe(kind, out / f"{STEM}.{kind}", FPS, Path(scratch)).armatures
            if len(armatures) != 1:
                problems.append(f"{kind.upper()}: Blender imported {len(armatures)} armatures, expected 1")
    report = validate_gltf(out / f"{STEM}.glb")
    if report["numErrors"]:
        problems.append(f"GLB: glTF validator found {report['numErrors']} errors")
    with av.open(str(out / f"{STEM}-preview.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    if frames != 180:
        problems.append(f"preview: {frames} frames decoded, expected 180")
    quality = json.loads((out / f"{STEM}-quality.json").read_text())
    if len(quality.get("tracks", [])) != 1:
        problems.append(f"quality report: {len(quality.get('tracks', []))} tracks, expected 1")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    problems = check(out)
    for problem in problems:
        print(f"demo output: {problem}", file=sys.stderr)
    if not problems:
        print(f"demo output in {out}: six files; BVH parses; FBX and GLB load in Blender with one armature; "
              "GLB valid glTF; preview decodes 180 frames")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
