"""Configuration of the tracker service (flags, `MOCAP_TRACKER_*` variables, defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mocap_common.config import ServiceConfig, setting


@dataclass(frozen=True)
class TrackerServiceConfig(ServiceConfig):
    """3D pose tracking of every person in a streamed video, under an inference lease."""

    service_name: ClassVar[str] = "tracker"

    port: int = setting(50052, "gRPC port.")
    model_dir: Path | None = setting(None, "BlazePose model cache (default $MOCAP_MODEL_DIR or "
                                           "~/.cache/mocap-mesh/models; filled by `make setup`).",
                                     env="MOCAP_MODEL_DIR")
    resource_addr: str = setting("127.0.0.1:50055", "Address of the resource broker (inference leases).",
                                 env="MOCAP_RESOURCE_ADDR")
    device: str = setting("any", "Device selector of the inference lease: any, <GPU index>, <GPU uuid>, cpu:0.")
    lease_ttl_s: float = setting(30.0, "TTL of the inference lease, seconds (kept alive at a third of it).")
    acquire_timeout_s: float = setting(600.0, "Longest wait for an inference slot, seconds (also bounded by "
                                              "the caller's deadline).")
    max_concurrent_calls: int = setting(2, "Track calls processed at once; more calls wait before taking a lease.")
    default_max_persons: int = setting(4, "People tracked at once when a request leaves max_persons at 0.")
    batch_size: int = setting(8, "Frames decoded and inferred together.")
    torch_threads: int = setting(2, "torch intra-op CPU threads.")
    spool_dir: Path = setting(Path("data/tracker/spool"), "Parent of the per-call temporary directories used "
                                                          "when a container must be spooled (MP4 without "
                                                          "faststart); each is removed when its call ends, "
                                                          "and those a killed tracker left when the tracker "
                                                          "starts (not those of a live one: each is locked).")
