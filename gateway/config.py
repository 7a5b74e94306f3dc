"""Gateway configuration: every option with its default, from `--flags` or `MOCAP_GATEWAY_*`.

Sizes are bytes, durations seconds. `python -m mocap_common.config` prints the table.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mocap_common.channels import channel_target
from mocap_common.config import ServiceConfig, setting

GiB = 1024**3
MiB = 1024**2
DAY_S = 24 * 3600.0

# The stage address forms (mocap_common.channels): calls go round robin over every replica.
_REPLICAS_HELP = (": one host:port, a comma list of ip:port (10.0.0.1:50052,10.0.0.2:50052) or dns:///name:port "
                  "(every A/AAAA record of the name, e.g. a headless Service); calls go round robin over all.")


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    """The public job API: uploads, job store, stage orchestration, retention."""

    service_name: ClassVar[str] = "gateway"

    port: int = setting(50051, "gRPC port of the public job API.")
    data_dir: Path = setting(Path("data"), "Directory for the job store (gateway.sqlite3) and jobs/{job}/ files.")
    database_url: str = setting("", "PostgreSQL URL of the job store shared by gateway replicas "
                                    "(postgresql://user:password@host:port/db); empty = SQLite in data_dir (one gateway).")
    replica_id: str = setting("", "This gateway's name in job claims and logs; empty = <hostname>-<pid>.")
    job_claim_ttl_s: float = setting(10.0, "A job's claim lapses this long after its replica's last heartbeat; another "
                                           "replica then takes the job over and resumes it (heartbeat every third of it).")
    job_poll_s: float = setting(1.0, "How often an idle replica looks for queued jobs and lapsed claims, seconds "
                                     "(a job created on the same replica starts at once).")
    max_job_claims: int = setting(5, "A job claimed this many times (its replicas kept dying) ends FAILED instead of "
                                     "being taken over again.")
    tokens_file: Path | None = setting(None, "YAML file `tokens: {<token>: <tenant>}`; empty = open single-user mode (tenant \"default\").")

    # Upload limits (reliability rule 7).
    max_upload_bytes: int = setting(2 * GiB, "Largest accepted video, bytes.")
    max_duration_s: float = setting(1800.0, "Longest accepted video, seconds.")
    max_frame_pixels: int = setting(3840 * 2160, "Most pixels per frame (width × height) accepted.")
    max_aspect_ratio: float = setting(4.0, "Widest (or tallest) frames accepted: width/height and height/width "
                                           "at most this. 4.0 admits every format in normal use (4:3, 16:9, "
                                           "9:16 phones, 2.39:1, 21:9, 32:9 = 3.56); the tracker refuses "
                                           "frames beyond 4:1 whatever this says.")
    max_active_jobs_per_tenant: int = setting(4, "Queued + running jobs + uploads streaming now, per tenant.")
    min_free_bytes: int = setting(1 * GiB, "Uploads are refused when the data disk would have less free space than this.")
    upload_commit_bytes: int = setting(64 * MiB, "An upload is fsynced and its resume point recorded every this many bytes (a broken stream records its exact end).")

    # Retention.
    upload_retention_s: float = setting(DAY_S, "How long an interrupted upload is kept for resuming, seconds.")
    job_retention_s: float = setting(7 * DAY_S, "How long an ended job and its files are kept, seconds.")
    retention_interval_s: float = setting(600.0, "How often the retention cleanup runs, seconds.")

    # Orchestration.
    tracker_addr: str = setting("127.0.0.1:50052", "TrackerService address" + _REPLICAS_HELP, env="MOCAP_TRACKER_ADDR")
    smoother_addr: str = setting("127.0.0.1:50053", "SmootherService address" + _REPLICAS_HELP, env="MOCAP_SMOOTHER_ADDR")
    exporter_addr: str = setting("127.0.0.1:50054", "ExporterService address" + _REPLICAS_HELP, env="MOCAP_EXPORTER_ADDR")
    max_running_jobs: int = setting(4, "Jobs processed at once (the rest wait QUEUED).")
    track_concurrency: int = setting(1, "Track stage calls at once.")
    smooth_concurrency: int = setting(4, "Smooth stage calls at once.")
    export_concurrency: int = setting(2, "Export stage calls at once.")
    track_timeout_s: float = setting(1800.0, "Deadline of one Track call, seconds.")
    smooth_timeout_s: float = setting(300.0, "Deadline of one Smooth call, seconds.")
    export_timeout_s: float = setting(900.0, "Deadline of one Export call, seconds.")
    job_timeout_s: float = setting(3600.0, "Deadline of a whole job from RUNNING, seconds; bounds every stage deadline.")
    # Stage retries: a stage call that fails UNAVAILABLE before the stage answered anything is
    # tried again, with exponential backoff and ±25 % jitter, until the stage's retry budget
    # (seconds from the first failure) is spent or stage_attempts tries were made. The budgets
    # cover a restart of the stage's service. Measured on the 2-core development machine (a child
    # process from exec to health SERVING, SIGKILLed and started again, 2026-12-04, 7 runs each,
    # the machine shared with other test runs): tracker 3.1-5.4 s (the fault run saw 5-8 s: the
    # pose models load), smoother 4.5-8.8 s (torch import, checkpoint load), exporter 1.0-2.4 s.
    # Each budget is about twice the slowest restart seen plus 2 s for the channel's reconnect
    # backoff (at most 2 s between connection attempts).
    stage_attempts: int = setting(20, "Most tries of a stage call that fails UNAVAILABLE before any response; "
                                      "the stage's retry budget usually ends the retries first.")
    stage_retry_backoff_s: float = setting(0.5, "Wait before the first retry of a stage call; doubles per retry (±25 % jitter).")
    stage_retry_backoff_max_s: float = setting(4.0, "Longest wait between two tries of a stage call, seconds.")
    track_retry_budget_s: float = setting(20.0, "How long a Track call is retried while the tracker is unreachable, seconds "
                                                "from the first failure (a tracker restarts in 3-8 s).")
    smooth_retry_budget_s: float = setting(20.0, "How long a Smooth call is retried while the smoother is unreachable, seconds "
                                                 "from the first failure (a smoother restarts in 3-9 s).")
    export_retry_budget_s: float = setting(10.0, "How long an Export call is retried while the exporter is unreachable, seconds "
                                                 "from the first failure (an exporter restarts in 1-2.5 s).")
    smooth_unary_max_bytes: int = setting(32 * MiB, "Tracks up to this serialized size go to Smooth, larger ones to SmoothStream.")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("max_upload_bytes", "max_duration_s", "max_frame_pixels", "max_active_jobs_per_tenant",
                    "upload_commit_bytes", "upload_retention_s", "job_retention_s", "retention_interval_s",
                    "max_running_jobs", "track_concurrency", "smooth_concurrency", "export_concurrency",
                    "track_timeout_s", "smooth_timeout_s", "export_timeout_s", "job_timeout_s", "stage_attempts",
                    "job_claim_ttl_s", "job_poll_s", "max_job_claims")
        bad = [name for name in positive if getattr(self, name) <= 0]
        if self.max_aspect_ratio < 1:  # a ratio of the long side to the short one
            bad.append("max_aspect_ratio (>= 1)")
        non_negative = ("min_free_bytes", "stage_retry_backoff_s", "stage_retry_backoff_max_s", "track_retry_budget_s",
                        "smooth_retry_budget_s", "export_retry_budget_s")
        negative = [name for name in non_negative if getattr(self, name) < 0]
        if bad or negative:
            raise SystemExit("gateway: " + "; ".join(
                part for part in (bad and f"these options must be > 0: {', '.join(bad)}",
                                  negative and f"these options must be >= 0: {', '.join(negative)}") if part))
        self._check_addresses_and_store()

    def _check_addresses_and_store(self) -> None:
        """Refuses a stage address list or database URL that could never work, at startup."""
        for name in ("tracker_addr", "smoother_addr", "exporter_addr"):
            try:
                channel_target(getattr(self, name))
            except ValueError as exc:
                raise SystemExit(f"gateway: {name}: {exc}") from None
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise SystemExit("gateway: database_url must be a postgresql:// URL (empty = SQLite in data_dir)")

    @property
    def replica_name(self) -> str:
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "gateway.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"
