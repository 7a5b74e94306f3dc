"""The main job, end to end, through all five real services started by `make run`'s launcher and
driven by the user's CLI: a video in, BVH / FBX / GLB, a preview MP4, the quality report and the
pose tracks out — checked with independent readers (the PyPI `bvh` parser, Blender's importers,
the Khronos glTF validator, PyAV)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from bvh import Bvh

from mocap.v1 import common_pb2
from tests.exporter.conftest import blender_probe, validate_gltf
from tests.support import RUNNER_MP4, STREET_AVI, shared_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MOCAP = Path(sys.executable).parent / "mocap"


def _submit(mesh, video: Path, out: Path) -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = subprocess.run([str(MOCAP), "--addr", mesh["gateway"], "--quiet", "submit", str(video), "--wait",
                             "--out", str(out)], env=mesh["env"], capture_output=True, text=True, timeout=600)
    result.seconds = time.monotonic() - started  # type: ignore[attr-defined]
    if result.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(mesh["logs"].glob("*.log")))
        pytest.fail(f"mocap submit exited {result.returncode}:\n{result.stderr[-3000:]}\n{logs}")
    return result


def _armature_count(kind: str, path: Path, fps: float, tmp: Path) -> int:
    return len(blender_probe(kind, path, fps, tmp).armatures)


def test_runner_becomes_bvh_fbx_glb_preview_and_quality_report(mesh, tmp_path):
    out = tmp_path / "out"
    _submit(mesh, RUNNER_MP4, out)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["runner_1080p-person-1.bvh", "runner_1080p-preview.mp4", "runner_1080p-quality.json",
                     "runner_1080p-tracks.pb", "runner_1080p.fbx", "runner_1080p.glb"]

    # BVH: an independent parser reads a full take of the clip at its frame rate.
    bvh = Bvh((out / "runner_1080p-person-1.bvh").read_text())
    assert bvh.nframes >= 175 and bvh.frame_time == pytest.approx(1 / 30, rel=1e-3)
    assert "Hips" in bvh.get_joints_names()

    # FBX and GLB: Blender re-imports one armature; the GLB is valid glTF 2.0.
    assert _armature_count("fbx", out / "runner_1080p.fbx", 30.0, tmp_path) == 1
    assert _armature_count("glb", out / "runner_1080p.glb", 30.0, tmp_path) == 1
    report = validate_gltf(out / "runner_1080p.glb")
    assert report["numErrors"] == 0, report["messages"]

    # Preview: a decodable MP4 covering the clip.
    with av.open(str(out / "runner_1080p-preview.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 180

    # Quality report: one person, tracked on (nearly) every frame, smoothing cut the jitter.
    quality = json.loads((out / "runner_1080p-quality.json").read_text())
    (track,) = quality["tracks"]
    assert int(track["framesTracked"]) >= 175 and track["framesSolvedFraction"] > 0.95
    assert 0 < track["jitterAfterMm"] < 0.5 * track["jitterBeforeMm"]
    assert quality["smoothingMethod"]

    # Pose tracks artifact: a PoseTrackSet that other tools can read.
    tracks = common_pb2.PoseTrackSet.FromString((out / "runner_1080p-tracks.pb").read_bytes())
    assert [t.track_id for t in tracks.tracks] == [1] and tracks.video.frame_count == 180

    # No intermediates left in the job's directory: only the input and the artifacts.
    (job_dir,) = (mesh["data"] / "jobs").iterdir()
    assert not list(job_dir.glob("tracks.*.pb"))


def test_street_gives_one_armature_per_person(mesh, tmp_path):
    out = tmp_path / "out"
    _submit(mesh, shared_file(STREET_AVI), out)
    bvh_files = sorted(out.glob("street_720p-person-*.bvh"))
    quality = json.loads((out / "street_720p-quality.json").read_text())
    people = len(quality["tracks"])
    assert people >= 3
    assert len(bvh_files) == people
    for path in bvh_files:
        assert Bvh(path.read_text()).nframes > 0
    assert _armature_count("fbx", out / "street_720p.fbx", 50.0, tmp_path) == people
    assert _armature_count("glb", out / "street_720p.glb", 50.0, tmp_path) == people
    report = validate_gltf(out / "street_720p.glb")
    assert report["numErrors"] == 0, report["messages"]
