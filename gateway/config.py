"""Gateway configuration: every option with its default, from `--flags` or `MOCAP_GATEWAY_*`.

Sizes are bytes, durations seconds. `python -m mocap_common.config` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mocap_common.config import ServiceConfig, setting

GiB = 1024**3
MiB = 1024**2
DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    """The public job API: uploads, job store, stage orchestration, retention."""

    service_name: ClassVar[str] = "gateway"

    port: int = setting(50051, "gRPC port of the public job API.")
    data_dir: Path = setting(Path("data"), "Directory for the job store (gateway.sqlite3) and jobs/{job}/ files.")
    tokens_file: str = setting("", "YAML file `tokens: {<token>: <tenant>}`; empty = open single-user mode (tenant \"default\").")

    # Upload limits (reliability rule 7).
    max_upload_bytes: int = setting(2 * GiB, "Largest accepted video, bytes.")
    max_duration_s: float = setting(1800.0, "Longest accepted video, seconds.")
    max_frame_pixels: int = setting(3840 * 2160, "Most pixels per frame (width × height) accepted.")
    max_active_jobs_per_tenant: int = setting(4, "Queued + running jobs + uploads streaming now, per tenant.")
    min_free_bytes: int = setting(1 * GiB, "Uploads are refused when the data disk would have less free space than this.")
    upload_commit_bytes: int = setting(64 * MiB, "An upload is fsynced and its resume point recorded every this many bytes (a broken stream records its exact end).")

    # Retention.
    upload_retention_s: float = setting(DAY_S, "How long an interrupted upload is kept for resuming, seconds.")
    job_retention_s: float = setting(7 * DAY_S, "How long an ended job and its files are kept, seconds.")
    retention_interval_s: float = setting(600.0, "How often the retention cleanup runs, seconds.")

    # Orchestration.
    tracker_addr: str = setting("127.0.0.1:50052", "TrackerService address.", env="MOCAP_TRACKER_ADDR")
    smoother_addr: str = setting("127.0.0.1:50053", "SmootherService address.", env="MOCAP_SMOOTHER_ADDR")
    exporter_addr: str = setting("127.0.0.1:50054", "ExporterService address.", env="MOCAP_EXPORTER_ADDR")
    max_running_jobs: int = setting(4, "Jobs processed at once (the rest wait QUEUED).")
    track_concurrency: int = setting(1, "Track stage calls at once.")
    smooth_concurrency: int = setting(4, "Smooth stage calls at once.")
    export_concurrency: int = setting(2, "Export stage calls at once.")
    track_timeout_s: float = setting(1800.0, "Deadline of one Track call, seconds.")
    smooth_timeout_s: float = setting(300.0, "Deadline of one Smooth call, seconds.")
    export_timeout_s: float = setting(900.0, "Deadline of one Export call, seconds.")
    job_timeout_s: float = setting(3600.0, "Deadline of a whole job from RUNNING, seconds; bounds every stage deadline.")
    stage_attempts: int = setting(3, "Tries of a stage call that fails UNAVAILABLE before any response.")
    stage_retry_backoff_s: float = setting(0.5, "Wait before the first retry of a stage call; doubles per retry.")
    smooth_unary_max_bytes: int = setting(32 * MiB, "Tracks up to this serialized size go to Smooth, larger ones to SmoothStream.")

    def __post_init__(self) -> None:
        positive = ("max_upload_bytes", "max_duration_s", "max_frame_pixels", "max_active_jobs_per_tenant",
                    "upload_commit_bytes", "upload_retention_s", "job_retention_s", "retention_interval_s",
                    "max_running_jobs", "track_concurrency", "smooth_concurrency", "export_concurrency",
                    "track_timeout_s", "smooth_timeout_s", "export_timeout_s", "job_timeout_s", "stage_attempts")
        bad = [name for name in positive if getattr(self, name) <= 0]
        if bad or self.min_free_bytes < 0 or self.stage_retry_backoff_s < 0:
            raise SystemExit(f"gateway: these options must be > 0: {', '.join(bad) or 'min_free_bytes/stage_retry_backoff_s >= 0'}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "gateway.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
