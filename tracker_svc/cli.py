"""Debug command: track a video file, save the tracks, optionally render an overlay.

    python -m tracker_svc track VIDEO --out tracks.npz [--max-persons N] [--overlay out.mp4]
                                      [--device cpu|cuda] [--threads N] [--model-dir DIR]

Also `python -m tracker_svc.cli track ...`; `python -m tracker_svc` without `track` is the gRPC
service (tracker_svc/__main__.py). `run_track` is the function behind it; the user CLI's
`mocap track` runs this command as a child process (the gateway never imports the tracker: its
install has no torch).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mocap_common.overlay import OverlayResult, write_overlay_video
from mocap_common.poses import PoseTrackSet
from mocap_common.trackio import save_track_set
from tracker_svc.errors import TrackerError
from tracker_svc.model_setup import model_paths
from tracker_svc.pipeline import PoseTracker, TrackerConfig
from tracker_svc.video import open_video


@dataclass(frozen=True)
class TrackSummary:
    track_set: PoseTrackSet
    seconds: float  # tracking wall time, decode included (model loading and overlay excluded)
    out: Path
    overlay: Path | None

    @property
    def fps(self) -> float:
        return self.track_set.video.frame_count / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        video = self.track_set.video
        lines = [
            f"{video.frame_count} frames {video.width}x{video.height} @ {video.fps:.2f} fps "
            f"({video.codec}/{video.container.split(',')[0]}), tracked in {self.seconds:.2f} s = {self.fps:.1f} fps",
            f"{len(self.track_set.tracks)} track(s) → {self.out}",
        ]
        for track in self.track_set.tracks:
            lines.append(
                f"  track {track.track_id}: {len(track)} frames "
                f"[{track.frame_index[0]}..{track.frame_index[-1]}], "
                f"{track.timestamp_s[0]:.2f}-{track.timestamp_s[-1]:.2f} s, mean score {track.score.mean():.2f}"
            )
        if self.overlay:
            lines.append(f"overlay → {self.overlay}")
        return lines


def run_track(
    video: Path | str, out: Path | str, *, max_persons: int | None = None, overlay: Path | str | None = None,
    device: str = "cpu", threads: int | None = None, model_dir: Path | str | None = None,
) -> TrackSummary:
    """Tracks `video`, writes the PoseTrackSet to `out` (.npz, see mocap_common.trackio), and the
    overlay video when asked. Raises TrackerError subclasses (models missing, bad video, ...)."""
    config = TrackerConfig()
    if max_persons is not None:
        config = replace(config, tracking=replace(config.tracking, max_persons=max_persons))
    tracker = PoseTracker(model_paths(model_dir), device=device, config=config, num_threads=threads)
    started = time.perf_counter()
    track_set = tracker.track_to_set(video)
    seconds = time.perf_counter() - started
    out = Path(out)
    save_track_set(out, track_set)
    overlay_path = None
    if overlay is not None:
        overlay_path = render_overlay(video, track_set, overlay).path
    return TrackSummary(track_set, seconds, out, overlay_path)


def render_overlay(video: Path | str, track_set: PoseTrackSet, out_path: Path | str) -> OverlayResult:
    """Decodes `video` again (with the tracker's own decoder, so frame indices match the tracks)
    and writes it with `track_set` drawn on it."""
    with open_video(video) as reader:
        frames = (rgb for batch in reader.batches(8) for rgb in batch.rgb)
        return write_overlay_video(frames, track_set, out_path, fps=reader.info.fps or None)


def main(argv: list[str] | None = None) -> int:
    return _track_command(sys.argv[1:] if argv is None else argv)


def _track_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracker_svc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    track = commands.add_parser("track", help="track the people in a video")
    track.add_argument("video", type=Path)
    track.add_argument("--out", type=Path, required=True, help="output .npz (PoseTrackSet)")
    track.add_argument("--max-persons", type=int, default=None, help="people followed at once")
    track.add_argument("--overlay", type=Path, default=None, help="also write a skeleton overlay MP4")
    track.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    track.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    track.add_argument("--model-dir", type=Path, default=None,
                       help="model cache (default $MOCAP_MODEL_DIR or ~/.cache/mocap-mesh/models)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        summary = run_track(
            args.video, args.out, max_persons=args.max_persons, overlay=args.overlay,
            device=args.device, threads=args.threads, model_dir=args.model_dir,
        )
    except TrackerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
