"""Tracker benchmark: end-to-end fps vs MediaPipe's CPU figures and LiteRT model time; peak RSS.

    python -m bench.bench_tracker [--device cpu|cuda] [--threads 2] [--repeats 3] [--skip-rss]

For runner_1080p.mp4 and street_720p.avi (../shared/media):
- tracker fps, decode included, best of --repeats runs (the CPU may be shared: best-of-N is the
  least noisy estimate), for the default multi-person config and for max_persons=1 (the same work
  as MediaPipe's legacy single-person Pose, whose fps are in shared/README.md);
- model-only time per frame on the same frames: LiteRT (XNNPACK, batch 1, --threads) running the
  detector and the landmark model once per frame, next to our torch port doing the same in
  batches of 8 (median per call, robust to contention bursts; LiteRT computes all five landmark
  outputs, the torch port prunes the unused segmentation head as the tracker does);
- peak RSS of tracking the 6 s clip and the same clip concatenated 10× (goal: ratio ≤ 1.2).
Writes bench/results/tracker-<UTC timestamp>.json (bench.common.write_result).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

# tracker_svc first: it sets OMP_WAIT_POLICY before torch loads OpenMP (see tracker_svc/__init__).
from tracker_svc.diagnostics import peak_rss_of_tracking, repeat_video
from tracker_svc.model_setup import model_paths
from tracker_svc.pipeline import Finished, PoseTracker, TrackerConfig
from tracker_svc.roi import letterbox_roi
from tracker_svc.video import open_video

import torch  # noqa: E402  (after tracker_svc, see above)

from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]

MEDIA = REPO.parent / "shared" / "media"
# MediaPipe's own CPU pipeline (legacy Pose, full model) on this 2-core machine, decode included
# (shared/README.md).
MEDIAPIPE_FPS = {"runner_1080p.mp4": 48.0, "street_720p.avi": 59.0}
RSS_GOAL = 1.2


def tracker_fps(tracker: PoseTracker, video: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        finished = None
        for event in tracker.track(video):
            if isinstance(event, Finished):
                finished = event
        seconds = time.perf_counter() - started
        assert finished is not None
        runs.append(finished.stats.frames / seconds)
    return {"fps_best": max(runs), "fps_runs": runs, "stats": asdict(finished.stats)}


def model_inputs(tracker: PoseTracker, video: Path, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector inputs (letterboxed frames) and landmark crops around real detections."""
    det_inputs, crops = [], []
    with torch.inference_mode(), open_video(video) as reader:
        for batch in reader.batches(8):
            for rgb in batch.rgb:
                frame = torch.from_numpy(rgb).to(tracker.device)
                view = letterbox_roi(rgb.shape[1], rgb.shape[0])
                x = tracker.detector.preprocess(frame, view)
                found = tracker.detector.detect(x, view)[0]
                det_inputs.append(x)
                if len(found):
                    crops.append(tracker.landmarks.preprocess(frame, found.body_rois()[[0]]))
                if len(det_inputs) >= limit:
                    return torch.cat(det_inputs).cpu(), torch.cat(crops).cpu()
    return torch.cat(det_inputs).cpu(), torch.cat(crops).cpu()


def litert_ms_per_frame(path: Path, inputs: torch.Tensor, threads: int, passes: int = 3) -> float:
    """Median time of one invoke (batch 1) over `passes` passes: robust to bursts of CPU contention."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    samples = inputs.permute(0, 2, 3, 1).contiguous().numpy()
    interpreter.set_tensor(index, samples[:1])
    interpreter.invoke()
    times = []
    for _ in range(passes):
        for sample in samples:
            started = time.perf_counter()
            interpreter.set_tensor(index, sample[None])
            interpreter.invoke()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def torch_ms_per_frame(module: torch.nn.Module, inputs: torch.Tensor, device: torch.device,
                       batch: int = 8, passes: int = 3) -> float:
    """Median time of one batched call over `passes` passes, per frame."""
    inputs = inputs.to(device)
    times = []
    with torch.inference_mode():
        module(inputs[:batch])
        for _ in range(passes):
            for i in range(0, len(inputs) - batch + 1, batch):
                _sync(device)
                started = time.perf_counter()
                module(inputs[i:i + batch])
                _sync(device)
                times.append((time.perf_counter() - started) / batch)
    return statistics.median(times) * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-frames", type=int, default=64, help="frames per clip for model-only timing")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = model_paths()
    multi = PoseTracker(models, device=device)
    one_person = replace(TrackerConfig(), tracking=replace(TrackerConfig().tracking, max_persons=1))
    single = PoseTracker(models, device=device, config=one_person)
    results: dict = {
        "device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "note": "best of N runs; the CPU may be shared",
        "videos": {},
    }
    for name, reference in MEDIAPIPE_FPS.items():
        video = MEDIA / name
        entry: dict = {"mediapipe_cpu_fps": reference}
        entry["tracker_multi"] = tracker_fps(multi, video, args.repeats)
        entry["tracker_single"] = tracker_fps(single, video, args.repeats)
        det_in, crops = model_inputs(multi, video, args.model_frames)
        litert = (litert_ms_per_frame(models.detector, det_in, args.threads)
                  + litert_ms_per_frame(models.landmark, crops, args.threads))
        ours = (torch_ms_per_frame(multi.detector.model, det_in, device)
                + torch_ms_per_frame(multi.landmarks.model, crops, device))
        entry["model_only_ms_per_frame"] = {"litert_batch1": litert, "torch_batch8": ours, "frames": len(det_in)}
        for key in ("tracker_multi", "tracker_single"):
            fps = entry[key]["fps_best"]
            entry[key]["vs_mediapipe"] = fps / reference
            entry[key]["vs_litert_models_only"] = fps / (1000 / litert)
        results["videos"][name] = entry
        print(f"{name}: tracker {entry['tracker_multi']['fps_best']:.1f} fps (multi-person, "
              f"{entry['tracker_multi']['stats']['tracks']} tracks), {entry['tracker_single']['fps_best']:.1f} fps "
              f"(max_persons=1) vs MediaPipe {reference:.0f} fps → ×{entry['tracker_single']['vs_mediapipe']:.2f}; "
              f"models only per frame: LiteRT {litert:.1f} ms ({1000 / litert:.0f} fps), torch {ours:.1f} ms")
    if not args.skip_rss:
        with tempfile.TemporaryDirectory() as tmp:
            long_clip = Path(tmp) / "runner_x10.mp4"
            repeat_video(MEDIA / "runner_1080p.mp4", long_clip, 10)
            short = peak_rss_of_tracking(MEDIA / "runner_1080p.mp4")
            long = peak_rss_of_tracking(long_clip)
        ratio = long["peak_rss_mib"] / short["peak_rss_mib"]
        results["peak_rss"] = {"clip_1x": short, "clip_10x": long, "ratio": ratio, "goal": RSS_GOAL}
        print(f"peak RSS: 6 s clip {short['peak_rss_mib']:.0f} MiB, 10× {long['peak_rss_mib']:.0f} MiB, "
              f"ratio {ratio:.2f} (goal ≤ {RSS_GOAL})")
    write_result("tracker", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
