"""Upload throughput: CreateJob through a gateway in its own process vs a plain copy of the same
bytes on the same disk.

The video is a real one (probe included): runner_1080p.mp4 remuxed 100 times into one ~208 MB
MP4 (18,000 frames, 10 min), built in a temp dir on the disk the gateway writes to. Each upload
is timed from the start of the call to the returned Job, so it counts everything the gateway does
before it answers: receiving, SHA-256, writing, fsync, probe, store. The reference is
`shutil.copyfile` of the same file plus an fsync of the copy (on Linux an in-kernel copy); a
user-space read/write copy is shown too, for scale. The stage services are absent; the jobs fail
after the upload, which is not measured. Ratio = reference seconds / upload seconds.

It also measures the transport's ceiling on the machine: the same client streaming the same
chunks to a bare grpc.aio server whose CreateJob only counts the bytes (no hashing, no file, no
probe). No gateway can be faster than that server; its ratio says how much of the goal the
Python gRPC transport leaves on this machine.

    python -m bench.bench_upload          (or: make bench)

Prints a table and writes bench/results/upload-<UTC>.json.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

import av  # noqa: E402
import grpc  # noqa: E402

from bench.common import bare_server  # noqa: E402
from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc  # noqa: E402
from tests.support import RUNNER_MP4, ServiceProcess, free_port  # noqa: E402

REPEATS = 3
COPIES = 100  # ~208 MB
CHUNK_SIZES = (1024 * 1024, 4 * 1024 * 1024)  # the CLI's chunk, and the protocol's largest
GOAL_RATIO = 0.7
_CHANNEL_OPTIONS = (("grpc.max_send_message_length", 64 << 20),)


def build_video(path: Path, copies: int = COPIES) -> None:
    """runner_1080p.mp4's packets `copies` times in a row, timestamps shifted: a valid long MP4."""
    with av.open(str(RUNNER_MP4)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.video[0]
        packets = [p for p in src.demux(stream) if p.dts is not None]
        out = dst.add_stream_from_template(stream)
        for i in range(copies):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts, q.duration = p.pts + i * stream.duration, p.dts + i * stream.duration, p.duration
                q.is_keyframe, q.time_base, q.stream = p.is_keyframe, p.time_base, out
                dst.mux(q)


def copy_seconds(src: Path, dst: Path) -> float:
    started = time.perf_counter()
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


def user_space_copy_seconds(src: Path, dst: Path, chunk: int = 1024 * 1024) -> float:
    """A copy through user space (read/write 1 MiB at a time) + fsync: what any process that
    receives bytes must at least do, without copyfile's in-kernel fast path."""
    started = time.perf_counter()
    with open(src, "rb", buffering=0) as reader, open(dst, "wb", buffering=0) as writer:
        while data := reader.read(chunk):
            writer.write(data)
        os.fsync(writer.fileno())
    elapsed = time.perf_counter() - started
    dst.unlink()
    return elapsed


def bare_transport_seconds(video: Path) -> dict[int, list[float]]:
    """Upload times of `video` to the bare server (bench.bare_server), per chunk size."""
    with bare_server("upload") as (address, _), grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        return _timed_uploads(gateway_pb2_grpc.GatewayServiceStub(channel), video, probed_frames=None)


def _timed_uploads(stub: gateway_pb2_grpc.GatewayServiceStub, video: Path,
                   probed_frames: int | None) -> dict[int, list[float]]:
    """REPEATS uploads of `video` per chunk size, each checked (size; frame count if probed).
    max_persons counts up so that no upload is a duplicate of an earlier one."""
    times: dict[int, list[float]] = {}
    persons = 0
    for chunk in CHUNK_SIZES:
        times[chunk] = []
        for _ in range(REPEATS):
            persons += 1
            elapsed, job = upload_seconds(stub, video, chunk, persons)
            assert job.size_bytes == video.stat().st_size
            assert probed_frames is None or job.video.frame_count == probed_frames
            times[chunk].append(elapsed)
    return times


def upload_seconds(stub: gateway_pb2_grpc.GatewayServiceStub, video: Path, chunk: int, persons: int) -> tuple[float, common_pb2.Job]:
    size = video.stat().st_size

    def requests():
        # No declared SHA-256 (no early duplicate answer); max_persons varies so no upload is a
        # duplicate of an earlier one: every byte is received, hashed, written and probed.
        yield gateway_pb2.CreateJobRequest(header=gateway_pb2.UploadHeader(
            filename=video.name, size_bytes=size, options=common_pb2.JobOptions(max_persons=persons)))
        with open(video, "rb") as handle:
            offset = 0
            while data := handle.read(chunk):
                yield gateway_pb2.CreateJobRequest(chunk=gateway_pb2.UploadChunk(offset=offset, data=data))
                offset += len(data)

    started = time.perf_counter()
    job = stub.CreateJob(requests(), timeout=600)
    return time.perf_counter() - started, job


def _rows(times_by_chunk: dict[int, list[float]], copy_s: float, mb: float, label: str) -> list[dict]:
    """Prints one table row per chunk size and returns them for the JSON."""
    rows = []
    for chunk, times in times_by_chunk.items():
        t = statistics.median(times)
        rows.append({"chunk_bytes": chunk, "seconds": times, "median_s": t, "mb_per_s": mb / t, "ratio": copy_s / t})
        print(f"{f'{label}, {chunk >> 20} MiB chunks':<34}{t:>9.3f}{mb / t:>9.0f}{copy_s / t:>8.2f}")
    return rows


def main() -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    try:
        video = root / "long.mp4"
        build_video(video)
        size = video.stat().st_size
        video.read_bytes()  # warm the page cache for both contenders alike

        copies = [copy_seconds(video, root / "copy.mp4") for _ in range(REPEATS)]
        user_copies = [user_space_copy_seconds(video, root / "copy.mp4") for _ in range(REPEATS)]

        bare = bare_transport_seconds(video)

        absent = f"127.0.0.1:{free_port()}"
        gateway = ServiceProcess("gateway", [
            "--data-dir", str(root / "data"), "--min-free-bytes", "0", "--max-active-jobs-per-tenant", "1000",
            "--log-level", "warning", "--stage-attempts", "1",
            "--tracker-addr", absent, "--smoother-addr", absent, "--exporter-addr", absent,
        ], log_path=root / "gateway.log")
        gateway.start()
        try:
            with grpc.insecure_channel(gateway.address, options=_CHANNEL_OPTIONS) as channel:
                uploads = _timed_uploads(gateway_pb2_grpc.GatewayServiceStub(channel), video,
                                         probed_frames=18_000 * COPIES // 100)
        finally:
            gateway.stop()

        copy_s = statistics.median(copies)
        mb = size / 1e6
        print(f"\nupload throughput, {mb:.0f} MB video (probe counted), median of {REPEATS}")
        print(f"{'method':<34}{'seconds':>9}{'MB/s':>9}{'ratio':>8}")
        print(f"{'copyfile + fsync (reference)':<34}{copy_s:>9.3f}{mb / copy_s:>9.0f}{1.0:>8.2f}")
        user_s = statistics.median(user_copies)
        print(f"{'read/write 1 MiB + fsync':<34}{user_s:>9.3f}{mb / user_s:>9.0f}{copy_s / user_s:>8.2f}")
        rows = _rows(uploads, copy_s, mb, "CreateJob")
        ceiling = _rows(bare, copy_s, mb, "bare gRPC server")
        print(f"goal: ratio >= {GOAL_RATIO}")
        result = {
            "benchmark": "upload",
            "time": datetime.now(UTC).isoformat(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "video_bytes": size,
            "repeats": REPEATS,
            "copy_seconds": copies,
            "copy_median_s": copy_s,
            "copy_mb_per_s": mb / copy_s,
            "user_space_copy_seconds": user_copies,
            "user_space_copy_median_s": user_s,
            "uploads": rows,
            "bare_transport_ceiling": ceiling,
            "goal_ratio": GOAL_RATIO,
            "probe_counted": True,
        }
        out_dir = REPO / "bench" / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        (out_dir / f"upload-{stamp}.json").write_text(json.dumps(result, indent=2))
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
