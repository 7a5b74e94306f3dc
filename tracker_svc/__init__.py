"""Tracker domain: video → multi-person BlazePose GHUM 3D tracks, with no gRPC in sight.

Public API (what the gRPC server and the CLI use):

    model_paths(cache_dir=None) -> ModelPaths          verified model files ("run `make setup`" if not)
    PoseTracker(models=None, device="cpu", config=TrackerConfig(), num_threads=None)
        .track(source, cancel=threading.Event(), spool_dir=None)
            -> Iterator[VideoOpened | Progress | TrackChunk | Finished]
        .track_to_set(source, cancel=None) -> PoseTrackSet
    ByteFeed()                                          bytes arriving from another thread
        .feed(chunk) / .finish() / .abort(error)
    write_overlay_video(frames, track_set, out) / render_overlay(video, track_set, out)
    save_track_set(path, set) / load_track_set(path)    the .npz debug format

Errors (tracker_svc.errors): TrackerError ← ModelsMissingError, ModelSetupError,
UnsupportedModelError, VideoError, TrackingCancelled.

Modules, top-down: pipeline (PoseTracker) → tracking (ids, association) → detector / landmarks
(models + MediaPipe pre/post-processing) → roi (regions, crops) → tflite_torch (the interpreter);
video (decoding, ByteFeed), overlay, trackio, model_setup, cli.
"""

import os

# OpenMP's default spin-waiting collapses throughput when the two cores are shared (with our own
# decoder thread, or with other processes): measured 4-30 fps instead of 25-36 fps for the same
# clip on a busy machine. libgomp reads this once, when torch is first imported, so it is set here,
# before this package imports torch; a process that imported torch earlier keeps its setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tracker_svc.errors import (  # noqa: E402
    ModelSetupError,
    ModelsMissingError,
    TrackerError,
    TrackingCancelled,
    UnsupportedModelError,
    VideoError,
)
from tracker_svc.model_setup import ModelPaths, model_paths  # noqa: E402
from tracker_svc.overlay import render_overlay, write_overlay_video  # noqa: E402
from tracker_svc.pipeline import (  # noqa: E402
    Finished,
    PoseTracker,
    Progress,
    TrackChunk,
    TrackerConfig,
    TrackerEvent,
    TrackStats,
    VideoOpened,
)
from tracker_svc.trackio import load_track_set, save_track_set  # noqa: E402
from tracker_svc.tracking import TrackingConfig  # noqa: E402
from tracker_svc.video import ByteFeed, VideoInfo  # noqa: E402

__all__ = [
    "ByteFeed", "Finished", "ModelPaths", "ModelSetupError", "ModelsMissingError", "PoseTracker",
    "Progress", "TrackChunk", "TrackStats", "TrackerConfig", "TrackerError", "TrackerEvent",
    "TrackingCancelled", "TrackingConfig", "UnsupportedModelError", "VideoError", "VideoInfo",
    "VideoOpened", "load_track_set", "model_paths", "render_overlay", "save_track_set",
    "write_overlay_video",
]
