"""The parent side of a Blender export: write a job spec, run `exporter_svc.blender_child` in a
child process, read back its files and timings.

The child runs in its own process group (`mocap_common.procs.child_process`): on timeout, on
cancellation of the calling task and on any error, the whole group — Blender and anything it
spawned — gets SIGTERM, then SIGKILL, and is reaped before this module returns or raises. If the
exporter itself dies (kill -9), the group is killed with it, so no Blender runs on unsupervised
past its timeout; and the child is recorded in `SPEC_DIR/child-process.json`, which the next
exporter's startup sweep (`workspace.sweep_orphans`) uses to kill anything that is still left
before it removes the directory. The spec directory belongs to the caller (the per-call temporary
directory), which removes it after the child is gone.

Spec (`SPEC_DIR/spec.json`, version 1): fps, scene frame range, output file names (relative to
SPEC_DIR) and per person: armature name, joint names, parent indices, rest offsets and bone tails
(metres, BVH body axes), rest hip height, first frame on the timeline, and two .npy files:
local rotations (F, J, 4) as continuous (w, x, y, z) quaternions and root positions (F, 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from exporter_svc import blender_child
from exporter_svc.rotations import quat_continuous, quat_from_matrix
from exporter_svc.skeleton import Motion, Skeleton
from mocap_common.errors import DeadlineExceeded, Internal
from mocap_common.logs import get_logger
from mocap_common.procs import RECORD_NAME, child_process

log = get_logger(__name__)

BLENDER_RUNS = Counter("mocap_exporter_blender_runs_total", "Blender child processes by how they ended "
                       "(ok, failed, timeout, cancelled).", ["outcome"])
BLENDER_RUNNING = Gauge("mocap_exporter_blender_running", "Blender child processes running now.")
BLENDER_SECONDS = Histogram("mocap_exporter_blender_seconds", "Wall time of Blender child processes that finished, seconds.",
                            buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600))

CHILD_MODULE = "exporter_svc.blender_child"
LOG_FILE = "blender.log"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class BlenderTimeout(DeadlineExceeded):
    """Blender did not finish in time; its process group was killed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"Blender did not finish within {timeout_s:g} s and was stopped",
                         reason="BLENDER_TIMEOUT", metadata={"timeout_s": f"{timeout_s:g}"})


class BlenderFailed(Internal):
    """The Blender child exited with an error (the message says which step, no internals)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="BLENDER_FAILED")


@dataclass
class BlenderPerson:
    track_id: int
    name: str  # armature object name, e.g. "person-1"
    skeleton: Skeleton
    motion: Motion  # the animation to write (IN_PLACE already applied)
    start_frame: int  # first frame on the shared timeline


@dataclass
class BlenderRun:
    outputs: dict[str, Path]  # "fbx" / "glb" → file
    seconds: float  # wall time of the child process
    startup_seconds: float  # from spawning the child until `import bpy` finished in it
    timings: dict[str, float] = field(default_factory=dict)


def write_spec(spec_dir: Path, persons: list[BlenderPerson], fps: float, formats: list[str],
               stem: str) -> dict[str, str]:
    """Writes spec.json and the arrays; returns the output file name per format."""
    outputs = {kind: f"{stem}.{kind}" for kind in formats}
    entries = []
    for person in persons:
        skeleton, motion = person.skeleton, person.motion
        quats = quat_continuous(quat_from_matrix(motion.local_rotations))
        rotations_file, root_file = f"{person.name}-rotations.npy", f"{person.name}-root.npy"
        np.save(spec_dir / rotations_file, quats.astype(np.float64))
        np.save(spec_dir / root_file, motion.root_positions.astype(np.float64))
        entries.append({
            "name": person.name,
            "track_id": person.track_id,
            "joints": list(skeleton.names),
            "parents": list(skeleton.parents),
            "offsets": skeleton.offsets.tolist(),
            "tails": [skeleton.bone_tail(j).tolist() for j in range(skeleton.joint_count)],
            "rest_hip_height": skeleton.rest_hip_height(),
            "frame_start": person.start_frame,
            "rotations": rotations_file,
            "root": root_file,
        })
    frame_start = min(p.start_frame for p in persons)
    frame_end = max(p.start_frame + p.motion.frame_count - 1 for p in persons)
    spec = {"version": blender_child.SPEC_VERSION, "fps": fps, "frame_start": frame_start,
            "frame_end": frame_end, "outputs": outputs, "persons": entries}
    (spec_dir / blender_child.SPEC_FILE).write_text(json.dumps(spec))
    return outputs


async def run_blender(spec_dir: Path, outputs: dict[str, str], *, python: str, timeout_s: float,
                      env: dict[str, str] | None = None) -> BlenderRun:
    """Runs the child on a written spec; raises BlenderTimeout / BlenderFailed. The child's whole
    process group is gone when this returns or raises (also when the caller is cancelled)."""
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), child_env.get("PYTHONPATH", "")]))
    child_env[blender_child.SPAWN_TIME_ENV] = repr(time.time())
    started = time.perf_counter()
    with open(spec_dir / LOG_FILE, "wb") as log_file:
        try:
            async with child_process([python, "-m", CHILD_MODULE, str(spec_dir)], env=child_env, cwd=spec_dir,
                                     stdout=log_file, stderr=log_file, record=spec_dir / RECORD_NAME) as proc:
                BLENDER_RUNNING.inc()
                try:
                    log.info("blender started", pid=proc.pid, timeout_s=timeout_s)
                    returncode = await asyncio.wait_for(proc.wait(), timeout_s)
                except TimeoutError:
                    log.warning("blender timed out; killing its process group", pid=proc.pid, timeout_s=timeout_s)
                    BLENDER_RUNS.labels("timeout").inc()
                    raise BlenderTimeout(timeout_s) from None
                finally:
                    BLENDER_RUNNING.dec()
        except asyncio.CancelledError:
            log.info("export cancelled; Blender's process group was killed")
            BLENDER_RUNS.labels("cancelled").inc()
            raise
    seconds = time.perf_counter() - started
    result = _read_result(spec_dir)
    files = {kind: spec_dir / name for kind, name in outputs.items()}
    missing = [kind for kind, path in files.items() if not path.is_file() or path.stat().st_size == 0]
    if returncode != 0 or not result.get("ok") or missing:
        BLENDER_RUNS.labels("failed").inc()
        tail = (spec_dir / LOG_FILE).read_bytes()[-4000:].decode(errors="replace")
        log.error("blender failed", returncode=returncode, reason=result.get("reason"), missing=missing, log_tail=tail)
        if returncode == 0 and result.get("ok"):
            raise BlenderFailed(f"Blender produced no {', '.join(missing).upper()} file")
        reason = result.get("reason") or f"exit status {returncode}"
        raise BlenderFailed(f"Blender export failed: {reason}")
    BLENDER_RUNS.labels("ok").inc()
    BLENDER_SECONDS.observe(seconds)
    timings = {k: float(v) for k, v in result.get("timings", {}).items()}
    log.info("blender finished", seconds=round(seconds, 3), **{k: round(v, 3) for k, v in timings.items()})
    startup = timings.get("startup_s", timings.get("import_bpy_s", 0.0))
    return BlenderRun(outputs=files, seconds=seconds, startup_seconds=startup,
                      timings=timings)


def _read_result(spec_dir: Path) -> dict[str, object]:
    try:
        return json.loads((spec_dir / blender_child.RESULT_FILE).read_text())
    except (OSError, ValueError):
        return {}


def default_python() -> str:
    return sys.executable
