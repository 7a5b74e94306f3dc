"""Jobs as the gateway keeps them: ids and resource names, the stored records, job options with
their defaults, and the conversion to the wire `mocap.v1.Job`.

A job's id is made by the server (`j-` + 20 random base32 characters); nothing a client sends is
ever used as a path. States follow common.proto:

    QUEUED ──▶ RUNNING ──▶ SUCCEEDED
       │           ├─────▶ FAILED
       └───────────┴─────▶ CANCELLED      (QUEUED ──▶ FAILED too, when its input is gone)
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, replace

from google.protobuf import timestamp_pb2

from mocap.v1 import common_pb2
from mocap_common.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    ServiceError,
    Unavailable,
    status_proto,
)
from mocap_common.limits import MAX_PERSONS_LIMIT

JobState = common_pb2.JobState
JobStage = common_pb2.JobStage

QUEUED = common_pb2.JOB_STATE_QUEUED
RUNNING = common_pb2.JOB_STATE_RUNNING
SUCCEEDED = common_pb2.JOB_STATE_SUCCEEDED
FAILED = common_pb2.JOB_STATE_FAILED
CANCELLED = common_pb2.JOB_STATE_CANCELLED

ACTIVE_STATES = frozenset({QUEUED, RUNNING})
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
# The states each state may be entered from; nothing leaves a terminal state.
ALLOWED_FROM: dict[int, frozenset[int]] = {
    RUNNING: frozenset({QUEUED}),
    SUCCEEDED: frozenset({RUNNING}),
    FAILED: frozenset({QUEUED, RUNNING}),
    CANCELLED: frozenset({QUEUED, RUNNING}),
}

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ID_RE = re.compile(r"^j-[a-z2-7]{20}$")
_ARTIFACT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}$")

DEFAULT_FORMATS = (common_pb2.OUTPUT_FORMAT_BVH, common_pb2.OUTPUT_FORMAT_FBX, common_pb2.OUTPUT_FORMAT_GLB)
DEFAULT_MAX_PERSONS = 4


def new_job_id() -> str:
    """`j-` + 20 random base32 characters (100 bits): unguessable, safe as a directory name."""
    return "j-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def now_us() -> int:
    return int(time.time() * 1_000_000)


def job_name(job_id: str) -> str:
    return f"jobs/{job_id}"


def artifact_name(job_id: str, artifact_id: str) -> str:
    return f"jobs/{job_id}/artifacts/{artifact_id}"


def upload_name(upload_id: str) -> str:
    return f"uploads/{upload_id}"


def parse_job_name(name: str, field_path: str = "name") -> str:
    """The job id in "jobs/{job}"; INVALID_ARGUMENT when malformed."""
    job_id = name[len("jobs/"):] if name.startswith("jobs/") else ""
    if not _ID_RE.match(job_id):
        raise InvalidArgument(f"{field_path} must look like \"jobs/j-…\"",
                              violations=[FieldViolation(field_path, "must be a job resource name \"jobs/{job}\"")])
    return job_id


def parse_upload_name(name: str, field_path: str = "name") -> str:
    """The upload id in "uploads/{upload}"; INVALID_ARGUMENT when malformed."""
    upload_id = name[len("uploads/"):] if name.startswith("uploads/") else ""
    if not _ID_RE.match(upload_id):
        raise InvalidArgument(f"{field_path} must look like \"uploads/j-…\"",
                              violations=[FieldViolation(field_path, "must be an upload resource name \"uploads/{upload}\"")])
    return upload_id


def parse_artifact_name(name: str, field_path: str = "name") -> tuple[str, str]:
    """(job id, artifact id) in "jobs/{job}/artifacts/{artifact}"; INVALID_ARGUMENT when malformed."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "jobs" or parts[2] != "artifacts" or not _ID_RE.match(parts[1]) \
            or not is_safe_file_name(parts[3]):
        raise InvalidArgument(f"{field_path} must look like \"jobs/j-…/artifacts/…\"",
                              violations=[FieldViolation(field_path, "must be \"jobs/{job}/artifacts/{artifact}\"")])
    return parts[1], parts[3]


def is_safe_file_name(name: str) -> bool:
    """Letters, digits, '.', '-', '_'; not starting with '.'; at most 255 characters."""
    return bool(_ARTIFACT_RE.match(name)) and name not in (".", "..")


# ---------------------------------------------------------------------------------------------
# Options


def canonical_options(options: common_pb2.JobOptions, field_path: str = "header.options") -> common_pb2.JobOptions:
    """Validates `options` and fills in the server defaults (formats sorted)."""
    violations: list[FieldViolation] = []
    known_formats = set(common_pb2.OutputFormat.values()) - {common_pb2.OUTPUT_FORMAT_UNSPECIFIED}
    seen: set[int] = set()
    for i, fmt in enumerate(options.formats):
        if fmt not in known_formats:
            violations.append(FieldViolation(f"{field_path}.formats[{i}]", f"unknown output format {fmt}"))
        elif fmt in seen:
            violations.append(FieldViolation(f"{field_path}.formats[{i}]", "duplicate output format"))
        seen.add(fmt)
    if options.smoothing not in common_pb2.SmoothingPreset.values():
        violations.append(FieldViolation(f"{field_path}.smoothing", f"unknown smoothing preset {options.smoothing}"))
    if options.root_motion not in common_pb2.RootMotion.values():
        violations.append(FieldViolation(f"{field_path}.root_motion", f"unknown root motion {options.root_motion}"))
    if not 0 <= options.max_persons <= MAX_PERSONS_LIMIT:
        violations.append(FieldViolation(f"{field_path}.max_persons", f"must be 0..{MAX_PERSONS_LIMIT} (0 = {DEFAULT_MAX_PERSONS})"))
    if violations:
        raise InvalidArgument("invalid job options", violations=violations)
    return common_pb2.JobOptions(
        formats=sorted(seen) or DEFAULT_FORMATS,
        smoothing=options.smoothing or common_pb2.SMOOTHING_PRESET_STANDARD,
        max_persons=options.max_persons or DEFAULT_MAX_PERSONS,
        skip_preview=options.skip_preview,
        root_motion=options.root_motion or common_pb2.ROOT_MOTION_PATH,
        disable_foot_locking=options.disable_foot_locking,
    )


def options_key(options: common_pb2.JobOptions) -> str:
    """A stable string for canonical options: equal keys mean the same work."""
    return options.SerializeToString(deterministic=True).hex()


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class JobError:
    reason: str  # an ErrorReason name without prefix, e.g. "STAGE_UNAVAILABLE"
    message: str
    stage: int = common_pb2.JOB_STAGE_UNSPECIFIED


# The status code each JobError reason stands for in JobError.status (documented there, in
# common.proto): a job that failed reads like a call that failed. Any other reason — STAGE_FAILED,
# whose stage's own code is not kept — is UNKNOWN (a plain ServiceError).
_JOB_ERROR_CODES: dict[str, type[ServiceError]] = {
    "STAGE_UNAVAILABLE": Unavailable,
    "STAGE_TIMEOUT": DeadlineExceeded,
    "INTERRUPTED": Aborted,
    "CANCELLED": Cancelled,
    "NO_PERSON": FailedPrecondition,
    "INTERNAL": Internal,
}
_STAGE_PREFIX = "JOB_STAGE_"


def job_error_proto(error: JobError) -> common_pb2.JobError:
    """The wire JobError, with its google.rpc.Status (code, message, ErrorInfo reason + stage)."""
    metadata = {"stage": common_pb2.JobStage.Name(error.stage).removeprefix(_STAGE_PREFIX)} if error.stage else None
    status = _JOB_ERROR_CODES.get(error.reason, ServiceError)(error.message, reason=error.reason, metadata=metadata)
    return common_pb2.JobError(reason=error.reason, message=error.message, stage=error.stage, status=status_proto(status))


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. Times are microseconds since the Unix epoch (0 = not yet)."""

    job_id: str
    tenant: str
    state: int
    display_filename: str
    size_bytes: int
    sha256: str
    options: common_pb2.JobOptions
    input_name: str  # "input.<ext>" in the job's directory (ext from the probe)
    video: common_pb2.VideoInfo
    create_us: int
    request_id: str = ""
    stage: int = common_pb2.JOB_STAGE_UNSPECIFIED
    progress: float = 0.0
    error: JobError | None = None
    artifacts: tuple[common_pb2.Artifact, ...] = ()
    quality: common_pb2.QualityReport | None = None
    update_us: int = 0
    start_us: int = 0
    end_us: int = 0
    expire_us: int = 0
    # The claim of the replica executing a RUNNING job (durable execution): its owner, a token
    # unique to this claim (every write of the executor names it, so a replica that lost the
    # claim can no longer write), and when it lapses unless renewed. `claims` counts how many
    # times the job was claimed (1 = never taken over).
    claim_owner: str = ""
    claim_token: str = ""
    claim_expire_us: int = 0
    claims: int = 0
    # The last stage whose output is stored with the job (TRACK: tracks.raw.pb, SMOOTH:
    # tracks.smooth.pb), and what that stage returned beside its tracks (a serialized
    # mocap.v1.StageCheckpoint-like blob owned by the pipeline): a job taken over resumes after it.
    completed_stage: int = common_pb2.JOB_STAGE_UNSPECIFIED
    checkpoint: bytes = b""

    @property
    def name(self) -> str:
        return job_name(self.job_id)

    @property
    def options_key(self) -> str:
        return options_key(self.options)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def with_changes(self, **changes: object) -> "JobRecord":
        return replace(self, **changes)


@dataclass(frozen=True)
class UploadRecord:
    """An upload from its header on. `upload_id` is also the id of the job it will become, and
    names its directory; `job_id` is set once complete (the new job, or the existing job it
    turned out to duplicate)."""

    upload_id: str
    tenant: str
    request_id: str
    display_filename: str
    size_bytes: int
    declared_sha256: str
    options: common_pb2.JobOptions
    committed_bytes: int
    create_us: int
    expire_us: int
    job_id: str = ""
    # Which replica streams the upload now, until when (renewed while it streams): a resume that
    # arrives at another replica meanwhile is refused UPLOAD_IN_PROGRESS, and the sweep of any
    # replica leaves it alone.
    stream_owner: str = ""
    stream_expire_us: int = 0

    @property
    def complete(self) -> bool:
        return bool(self.job_id)

    @property
    def options_key(self) -> str:
        return options_key(self.options)


# ---------------------------------------------------------------------------------------------
# Wire form


def timestamp(us: int) -> timestamp_pb2.Timestamp | None:
    if not us:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(us)
    return ts


def to_proto(job: JobRecord) -> common_pb2.Job:
    """The job as clients see it."""
    msg = common_pb2.Job(
        name=job.name,
        display_filename=job.display_filename,
        state=job.state,
        stage=job.stage,
        progress=job.progress,
        options=job.options,
        video=job.video,
        size_bytes=job.size_bytes,
        sha256=job.sha256,
        request_id=job.request_id,
        artifacts=job.artifacts if job.state == SUCCEEDED else (),
        create_time=timestamp(job.create_us),
        update_time=timestamp(job.update_us or job.create_us),
        start_time=timestamp(job.start_us),
        end_time=timestamp(job.end_us),
        expire_time=timestamp(job.expire_us),
    )
    if job.error is not None:
        msg.error.CopyFrom(job_error_proto(job.error))
    if job.quality is not None and job.state == SUCCEEDED:
        msg.quality.CopyFrom(job.quality)
    return msg
