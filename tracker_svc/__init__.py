"""Tracker domain: video → multi-person BlazePose GHUM 3D tracks, with no gRPC in sight.

This file stays light on purpose: importing `tracker_svc` (or a light submodule such as
`tracker_svc.config` or `tracker_svc.model_setup`) loads no torch, PyAV or models. Import what you
need from its module:

    tracker_svc.model_setup   model_paths(cache_dir=None) -> ModelPaths  (verified model files)
    tracker_svc.pipeline      PoseTracker(models=None, device="cpu", config=TrackerConfig(), num_threads=None)
                                  .track(source, cancel, spool_dir) -> Iterator[VideoOpened | Progress
                                  | TrackChunk | Finished];  .track_to_set(source, cancel=None) -> PoseTrackSet
    tracker_svc.video         ByteFeed (bytes arriving from another thread), open_video
    tracker_svc.cli           run_track(...), render_overlay(video, track_set, out); `python -m tracker_svc track`
    tracker_svc.errors        TrackerError ← ModelsMissingError, ModelSetupError, UnsupportedModelError,
                              VideoError, TrackingCancelled

Shared with other services (in mocap_common, since services never import each other): the overlay
renderer (`mocap_common.overlay`) and the .npz track format (`mocap_common.trackio`).

Modules, top-down: server (gRPC) → service (leases, calls) → pipeline (PoseTracker) → tracking
(ids, association) → detector / landmarks (models + MediaPipe pre/post-processing) → roi (regions,
crops) → tflite_torch (the interpreter); video (decoding, ByteFeed), model_setup, cli, diagnostics.
"""

import os

# OpenMP's default spin-waiting collapses throughput when the two cores are shared (with our own
# decoder thread, or with other processes): measured 4-30 fps instead of 25-36 fps for the same
# clip on a busy machine. libgomp reads this once, when torch is first imported. Python runs this
# package file before any tracker_svc submodule (every one of which may import torch), and before
# `python -m tracker_svc` runs __main__, so setting it here is early enough in the tracker's own
# process; a process that imported torch earlier keeps its setting. It costs no import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
