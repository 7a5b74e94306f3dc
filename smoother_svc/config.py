"""Configuration of the smoother service (flags, `MOCAP_SMOOTHER_*` variables, defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mocap_common.config import ServiceConfig, setting
from mocap_common.server import MAX_MESSAGE_BYTES


# The three CMU clips the learned smoother trains on ship inside the package (xz-compressed,
# with their attribution), so a fresh clone and the smoother's container can train without
# any other download.
TRAINING_MOTION_DIR = Path(__file__).resolve().parent / "training_motion"


@dataclass(frozen=True)
class SmootherConfig(ServiceConfig):
    """Temporal filtering of pose tracks and the learned smoother's training."""

    service_name: ClassVar[str] = "smoother"

    port: int = setting(50053, "gRPC port.")
    checkpoint_dir: Path = setting(Path("data/smoother/checkpoints"),
                                   "Directory of the learned smoother's checkpoints (v1.pt, v2.pt, ...); "
                                   "the newest is served.")
    resource_addr: str = setting("127.0.0.1:50055", "Address of the resource broker (training leases).",
                                 env="MOCAP_RESOURCE_ADDR")
    max_unary_bytes: int = setting(MAX_MESSAGE_BYTES,
                                   "Largest Smooth response in bytes (at most the 64 MiB message limit); "
                                   "bigger results must use SmoothStream.")
    max_stream_frames: int = setting(2_000_000,
                                     "Most frames (all tracks together) one SmoothStream call may send; "
                                     "about 3 KB of memory per frame while smoothing.")
    smooth_workers: int = setting(2, "Smooth calls computed at once (threads); more calls wait.")
    torch_threads: int = setting(1, "torch intra-op threads (1: OpenMP threads spinning on shared cores slow "
                                    "everything down many times over).")
    # Training defaults (a TrainRequest field of 0 takes these).
    train_epochs: int = setting(8, "Default epochs of a Train call.")
    train_steps_per_epoch: int = setting(128, "Default optimisation steps per epoch.")
    train_batch_size: int = setting(256, "Default windows per optimisation step.")
    train_learning_rate: float = setting(1e-3, "Default Adam learning rate.")
    train_max_seconds: float = setting(900.0, "Default wall-clock limit of one training run, seconds.")
    train_device: str = setting("any", "Default device selector of the training lease: any, <index>, <uuid>, cpu:0.")
    lease_ttl_s: float = setting(30.0, "TTL of the training lease, seconds (kept alive at a third of it).")
    lease_acquire_timeout_s: float = setting(600.0,
                                             "Longest wait for a training slot, seconds (also bounded by the "
                                             "caller's deadline).")
    mocap_dir: Path = setting(TRAINING_MOTION_DIR, "Directory with the training motion: the CMU clips "
                                                   "cmu_131_0{1,2,3}.bvh (or .bvh.xz); default: the ones "
                                                   "shipped in smoother_svc/training_motion/.")
    noise_model_path: Path | None = setting(None, "Tracker noise model JSON (default: the one shipped in "
                                                  "smoother_svc/tracker_noise.json).")
