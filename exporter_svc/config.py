"""Exporter configuration: defaults, then MOCAP_EXPORTER_* environment variables, then flags."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mocap_common.config import ServiceConfig, setting


@dataclass(frozen=True)
class ExporterConfig(ServiceConfig):
    """Skeleton solve and BVH / FBX / GLB export (Blender in a child process)."""

    service_name: ClassVar[str] = "exporter"

    port: int = setting(50054, "gRPC port.")
    work_dir: Path = setting(Path("data/exporter/work"), "Directory for per-call temporary directories (export-*); "
                             "owned by this service: leftovers are removed at startup.")
    blender_timeout_s: float = setting(300.0, "Longest a Blender child may run (FBX + GLB of one call) before "
                                       "its process group is killed (BLENDER_TIMEOUT).")
    blender_python: str = setting("", "Python interpreter that runs the Blender child (needs the bpy package); "
                                  "empty = the exporter's own interpreter.")
    max_concurrent_blender: int = setting(2, "Blender children running at once across all calls; more calls wait.")
    max_video_bytes: int = setting(4 * 1024**3, "Largest input video accepted for the preview, bytes.")
    max_pose_frames: int = setting(1_000_000, "Most pose frames (over all tracks) accepted in one call.")
    max_tracks: int = setting(64, "Most tracks accepted in one call.")

    def blender_interpreter(self) -> str:
        return self.blender_python or sys.executable
