"""Exporter benchmark: time per format for a 1 000-frame take of one person, and the share of
Blender's start-up (spawning the child and `import bpy`) in it.

    python -m bench.bench_exporter [--repeats 3] [--frames 1000]

The take is CMU subject 131 (shipped in smoother_svc/training_motion/, 120 fps) mapped to BlazePose
landmarks. Each step runs `repeats` times; the table shows medians. Reference: the notes measured
~2.5 s for bpy to import a 1 000-frame BVH and write FBX and GLB on this 2-core machine.
Results: bench/results/exporter-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from exporter_svc.blender_job import BlenderPerson, run_blender, write_spec  # noqa: E402
from exporter_svc.bvh_writer import write_bvh  # noqa: E402
from exporter_svc.export import ExportInput, ExportOptions, Exporter  # noqa: E402
from exporter_svc.solve import SolveOptions, TakeInput, solve_take  # noqa: E402
from mocap_common.bvh import cmu_landmarks, find_bvh, hip_centred, read_bvh  # noqa: E402
from mocap_common.logs import configure_logging  # noqa: E402
from mocap_common.poses import PoseTrack, VideoInfo  # noqa: E402

MOCAP = REPO / "smoother_svc" / "training_motion"  # shipped, xz-compressed
REFERENCE_BPY_S = 2.5  # notes: bpy import BVH + FBX + GLB export of a 1 000-frame clip
FPS = 120.0


def _landmarks(frames: int) -> np.ndarray:
    landmarks = cmu_landmarks(read_bvh(find_bvh(MOCAP, "cmu_131_02")))
    reps = -(-frames // len(landmarks))
    return np.concatenate([landmarks] * reps)[:frames]


def _track(landmarks: np.ndarray) -> PoseTrack:
    n = len(landmarks)
    f = 960 / np.tan(np.radians(30))
    cam = landmarks + [0.0, 1.0, 4.5]
    image = np.ones((n, 33, 5), np.float32)
    image[..., 0] = cam[..., 0] / cam[..., 2] * f + 960
    image[..., 1] = cam[..., 1] / cam[..., 2] * f + 540
    return PoseTrack(track_id=1, frame_index=np.arange(n), timestamp_s=np.arange(n) / FPS, image=image,
                     world=hip_centred(landmarks).astype(np.float32), bbox=np.zeros((n, 4), np.float32),
                     score=np.ones(n, np.float32))


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[object]]:
    times, results = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - started)
    return statistics.median(times), results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1000)
    args = parser.parse_args(argv)
    configure_logging("bench", "warning", "console")  # the table, not per-run log lines
    landmarks = _landmarks(args.frames)
    root = 0.5 * (landmarks[:, 23] + landmarks[:, 24])
    take_input = TakeInput(world=landmarks - root[:, None], visibility=np.ones(landmarks.shape[:2]), root=root)
    rows: list[dict] = []

    solve_s, takes = _median_time(lambda: solve_take(take_input, SolveOptions(fps=FPS)), args.repeats)
    take = takes[0]
    rows.append({"step": "solve (bones, rotations, contacts, foot locking)", "seconds": solve_s})

    with tempfile.TemporaryDirectory(prefix="bench-exporter-") as tmp:
        tmp_path = Path(tmp)
        bvh_s, _ = _median_time(lambda: write_bvh(tmp_path / "take.bvh", take.skeleton, take.motion, FPS), args.repeats)
        rows.append({"step": "BVH (native writer)", "seconds": bvh_s, "bytes": (tmp_path / "take.bvh").stat().st_size})

        person = BlenderPerson(1, "person-1", take.skeleton, take.motion, 0)
        counter = iter(range(10**6))

        def blender(formats: list[str]):
            spec_dir = tmp_path / f"spec-{next(counter)}"
            spec_dir.mkdir()
            outputs = write_spec(spec_dir, [person], FPS, formats, "take")
            run = asyncio.run(run_blender(spec_dir, outputs, python=sys.executable, timeout_s=600))
            return run, {k: p.stat().st_size for k, p in run.outputs.items()}

        for formats, label in ((["fbx"], "FBX (Blender child)"), (["glb"], "GLB (Blender child)"),
                               (["fbx", "glb"], "FBX + GLB in one Blender child (what the service runs)")):
            seconds, runs = _median_time(lambda f=formats: blender(f), args.repeats)
            startup = statistics.median(r[0].startup_seconds for r in runs)
            rows.append({"step": label, "seconds": seconds, "blender_startup_s": startup,
                         "startup_share": startup / seconds, "bytes": runs[0][1],
                         "child_timings": runs[0][0].timings,
                         "vs_reference": seconds / REFERENCE_BPY_S if len(formats) == 2 else None})

        exporter = Exporter(python=sys.executable, blender_timeout_s=600)
        video = VideoInfo(width=1920, height=1080, fps=FPS, frame_count=args.frames, duration_s=args.frames / FPS)
        job = ExportInput(tracks=[_track(landmarks)], video=video)
        options = ExportOptions(formats=("bvh", "fbx", "glb"), preview=False, in_place=False, foot_locking=True,
                                name_stem="bench")

        def whole_export():
            with tempfile.TemporaryDirectory(dir=tmp_path) as work:
                return asyncio.run(exporter.export(job, options, Path(work)))

        seconds, outcomes = _median_time(whole_export, args.repeats)
        rows.append({"step": "whole export, BVH + FBX + GLB + report (domain, no gRPC)", "seconds": seconds,
                     "blender_startup_s": outcomes[0].blender_startup_seconds,
                     "startup_share": outcomes[0].blender_startup_seconds / seconds,
                     "clip_seconds": args.frames / FPS})

    print(f"\nexporter: {args.frames} frames, one person, median of {args.repeats} "
          f"(machine shared: timings are noisy)\n")
    print(f"{'step':<58} {'seconds':>8} {'startup':>8} {'share':>6} {'vs 2.5 s':>9}")
    for row in rows:
        startup = f"{row['blender_startup_s']:.2f}" if "blender_startup_s" in row else ""
        share = f"{row['startup_share'] * 100:.0f} %" if "startup_share" in row else ""
        ref = f"{row['vs_reference']:.2f}×" if row.get("vs_reference") else ""
        print(f"{row['step']:<58} {row['seconds']:>8.3f} {startup:>8} {share:>6} {ref:>9}")
    result = {
        "benchmark": "exporter",
        "utc": datetime.now(timezone.utc).isoformat(),
        "frames": args.frames,
        "fps": FPS,
        "repeats": args.repeats,
        "reference_bpy_seconds": REFERENCE_BPY_S,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": _cpu_count(), "threads": threading.active_count()},
        "rows": rows,
    }
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"exporter-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwritten {path.relative_to(REPO)}")
    return result


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    main()
