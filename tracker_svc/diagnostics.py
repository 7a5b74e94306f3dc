"""Measuring the tracker: longer test videos and peak memory of a tracking run.

Used by the memory test and bench/bench_tracker.py:

    repeat_video(src, dst, times)       the clip concatenated `times` times (stream copy, no re-encode)
    peak_rss_of_tracking(video, ...)    track `video` in a fresh Python process; its peak RSS in MiB

    python -m tracker_svc.diagnostics rss VIDEO [--max-persons N]   (what peak_rss_of_tracking runs)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import av


def repeat_video(src: Path | str, dst: Path | str, times: int) -> int:
    """Writes the video stream of `src` `times` times in a row into `dst`; returns frames written.

    Packets are copied with their timestamps shifted by the clip's length, so each copy starts at
    a keyframe right after the previous one (MP4/MKV output by `dst`'s suffix).
    """
    with av.open(str(src)) as source:
        stream = source.streams.video[0]
        packets = [p for p in source.demux(stream) if p.dts is not None and p.size]
        step = _frame_step(packets)
        length = max(p.pts for p in packets) - min(p.pts for p in packets) + step
        with av.open(str(dst), mode="w") as out:
            out_stream = out.add_stream_from_template(stream)
            for copy in range(times):
                for packet in packets:
                    packet.pts += length if copy else 0
                    packet.dts += length if copy else 0
                    packet.stream = out_stream
                    out.mux(packet)
    return len(packets) * times


def _frame_step(packets: list[av.Packet]) -> int:
    pts = sorted(p.pts for p in packets)
    steps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    return min(steps) if steps else 1


def peak_rss_of_tracking(video: Path | str, *, max_persons: int | None = None, timeout_s: float = 1800) -> dict:
    """Tracks `video` in a fresh interpreter; returns {"peak_rss_mib", "frames", "seconds", "tracks"}."""
    command = [sys.executable, "-m", "tracker_svc.diagnostics", "rss", str(video)]
    if max_persons is not None:
        command += ["--max-persons", str(max_persons)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"tracking {video} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rss_main(video: Path, max_persons: int | None) -> None:
    import time
    from dataclasses import replace

    import torch

    from tracker_svc.pipeline import Finished, PoseTracker, TrackerConfig

    torch.set_num_threads(2)
    config = TrackerConfig()
    if max_persons is not None:
        config = replace(config, tracking=replace(config.tracking, max_persons=max_persons))
    tracker = PoseTracker(config=config)
    started = time.perf_counter()
    finished = None
    for event in tracker.track(video):
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({
        "peak_rss_mib": peak_kib / 1024, "frames": finished.stats.frames,
        "seconds": seconds, "tracks": finished.stats.tracks,
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracker_svc.diagnostics")
    commands = parser.add_subparsers(dest="command", required=True)
    rss = commands.add_parser("rss", help="track a video and print peak RSS as JSON")
    rss.add_argument("video", type=Path)
    rss.add_argument("--max-persons", type=int, default=None)
    args = parser.parse_args(argv)
    _rss_main(args.video, args.max_persons)
    return 0


if __name__ == "__main__":
    sys.exit(main())
