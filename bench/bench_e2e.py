"""End to end: a video through all five real services (started by `make run`'s launcher), timed
from the first uploaded byte to SUCCEEDED, as a multiple of the clip's own length.

Each clip is submitted once to warm up (first call loads models and Blender's caches), then
`REPEATS` times (the job is deleted between runs so the content dedup does not answer from the
previous job). Per-stage times come from the job's persisted events. Goal: runner_1080p in ≤ 2×
its 6 s length on a 2-core machine.

    python -m bench.bench_e2e      (or: make bench)
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import write_result
from gateway.client import Connection, sha256_file, upload_video, watch_job
from mocap.v1 import common_pb2, gateway_pb2
from tests.support import REPO, RUNNER_MP4, STREET_AVI, free_port_run, wait_serving

REPEATS = 3
GOAL = 2.0
CLIPS = {"runner_1080p": (RUNNER_MP4, 6.0), "street_720p": (STREET_AVI, 4.1)}


def start_mesh(tmp: Path) -> tuple[subprocess.Popen, str]:
    base = free_port_run(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCAP_")}
    env.update(PYTHONUNBUFFERED="1", MOCAP_GATEWAY_DATA_DIR=str(tmp / "gateway"),
               MOCAP_RESOURCE_DB_PATH=str(tmp / "leases.sqlite3"), MOCAP_TRACKER_SPOOL_DIR=str(tmp / "spool"),
               MOCAP_EXPORTER_WORK_DIR=str(tmp / "exporter"))
    launcher = subprocess.Popen([sys.executable, "-m", "mocap_common.launcher", "--base-port", str(base),
                                 "--log-dir", str(tmp / "logs")], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    gateway = f"127.0.0.1:{base + 4}"
    wait_serving(gateway, timeout_s=300)
    return launcher, gateway


def run_job(conn: Connection, video: Path) -> dict[str, float]:
    started = time.perf_counter()
    job = upload_video(conn, video, options=common_pb2.JobOptions(), request_id=uuid.uuid4().hex,
                       sha256=sha256_file(video))
    uploaded = time.perf_counter()
    stage_start: dict[int, float] = {}
    stage_seconds: dict[str, float] = {}

    def on_event(event: gateway_pb2.JobEvent) -> None:
        now = time.perf_counter()
        name = common_pb2.JobStage.Name(event.stage).removeprefix("JOB_STAGE_").lower()
        if event.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_STARTED:
            stage_start[event.stage] = now
        elif event.type == gateway_pb2.JOB_EVENT_TYPE_STAGE_FINISHED and event.stage in stage_start:
            stage_seconds[name] = now - stage_start[event.stage]

    final = watch_job(conn, job.name, on_event)
    ended = time.perf_counter()
    if final.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{job.name} ended {common_pb2.JobState.Name(final.state)}: {final.error.message}")
    conn.stub.DeleteJob(gateway_pb2.DeleteJobRequest(name=job.name))
    return {"total_s": ended - started, "upload_s": uploaded - started, **{f"{k}_s": v for k, v in stage_seconds.items()}}


def main() -> int:
    figures: dict[str, object] = {"goal_multiple_of_clip_length": GOAL, "repeats": REPEATS}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        launcher, gateway = start_mesh(Path(tmp))
        conn = Connection(gateway, "")
        try:
            print(f"{'clip':<14}{'length s':>9}{'total s':>9}{'× length':>9}{'upload':>8}{'track':>8}{'smooth':>8}{'export':>8}")
            for name, (video, length_s) in CLIPS.items():
                warm = run_job(conn, video)
                runs = [run_job(conn, video) for _ in range(REPEATS)]
                median = {key: statistics.median(r.get(key, 0.0) for r in runs) for key in runs[0]}
                multiple = median["total_s"] / length_s
                figures[name] = {"clip_length_s": length_s, "warmup": warm, "runs": runs, "median": median,
                                 "multiple_of_length": multiple}
                print(f"{name:<14}{length_s:>9.1f}{median['total_s']:>9.2f}{multiple:>9.2f}{median['upload_s']:>8.2f}"
                      f"{median.get('track_s', 0):>8.2f}{median.get('smooth_s', 0):>8.2f}{median.get('export_s', 0):>8.2f}")
        finally:
            conn.close()
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(120)
    runner = figures["runner_1080p"]["multiple_of_length"]  # type: ignore[index]
    print(f"runner_1080p end to end: {runner:.2f}× its length (goal ≤ {GOAL}×): {'met' if runner <= GOAL else 'NOT met'}")
    write_result("e2e", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
