"""The gateway's Python client library: a connection, uploads that resume by themselves, watching
a job across reconnects, and downloads checked against their checksum. No terminal output: the
`mocap` command (`gateway.cli`) and the benchmarks build on it.

    conn = Connection("127.0.0.1:50051", token)
    job = upload_video(conn, path, options=options, request_id=str(uuid.uuid4()), sha256=sha256_file(path))
    job = watch_job(conn, job.name, on_event=print)
    download_artifact(conn, job.artifacts[0], Path("out.bvh"))

Uploads resume: a request_id is made once per upload, and when the stream breaks the client asks
GetUpload how many bytes the gateway holds and sends the rest. Downloads resume from a PATH.part
file and are checked against the artifact's SHA-256 before they are renamed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from mocap_common.files import sha256_file
from mocap_common.rpc_errors import RpcErrorDetails, describe_rpc_error

DEFAULT_ADDR = "127.0.0.1:50051"
CHUNK_BYTES = 1024 * 1024
UPLOAD_ATTEMPTS = 8
WATCH_RECONNECTS = 10
DOWNLOAD_ATTEMPTS = 5
UNARY_TIMEOUT_S = 30.0

# A broken stream shows up as one of these with no ErrorInfo reason from the gateway.
_TRANSPORT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}


class DownloadError(Exception):
    """A download arrived out of order or does not match the artifact's size and SHA-256."""


# ---------------------------------------------------------------------------------------------
# Connection


class Connection:
    """The gateway stub plus the caller's credentials."""

    def __init__(self, addr: str, token: str) -> None:
        self.addr = addr
        self.channel = grpc.insecure_channel(addr, options=(("grpc.max_receive_message_length", 64 << 20),
                                                            ("grpc.max_send_message_length", 64 << 20)))
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def get_job(self, name: str) -> common_pb2.Job:
        return self.stub.GetJob(gateway_pb2.GetJobRequest(name=name), metadata=self.metadata, timeout=UNARY_TIMEOUT_S)


def is_message_too_large(details: RpcErrorDetails) -> bool:
    """RESOURCE_EXHAUSTED made by gRPC itself (a message over a size limit, ours or the server's):
    it has no ErrorInfo and no RetryInfo, unlike the gateway's "busy" answers
    (TOO_MANY_ACTIVE_JOBS, INSUFFICIENT_STORAGE), and retrying the same message cannot help."""
    return details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not details.reason and details.retry_after_s is None


def job_name(text: str) -> str:
    """Accepts "jobs/j-…" or "j-…"."""
    return text if text.startswith("jobs/") else f"jobs/{text}"


def _backoff(attempt: int, cap: float = 8.0) -> float:
    return min(cap, 0.5 * 2**attempt)


# ---------------------------------------------------------------------------------------------
# Upload


def upload_video(conn: Connection, path: Path, *, options: common_pb2.JobOptions, request_id: str, sha256: str,
                 filename: str | None = None, on_offset: Callable[[int], None] = lambda n: None,
                 attempts: int = UPLOAD_ATTEMPTS, chunk_bytes: int = CHUNK_BYTES) -> common_pb2.Job:
    """Uploads `path` as a new job, resuming after broken streams (bounded by `attempts`).
    `on_offset(n)` reports the byte offset the upload has reached."""
    size = path.stat().st_size
    offset = 0
    last_error: grpc.RpcError | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(_backoff(attempt - 1))
            found = _resume_point(conn, request_id)
            if isinstance(found, common_pb2.Job):
                return found
            offset = found
        header = gateway_pb2.UploadHeader(filename=filename or path.name, size_bytes=size, sha256=sha256,
                                          request_id=request_id, options=options, resume_offset=offset)
        try:
            return conn.stub.CreateJob(_upload_requests(path, header, offset, on_offset, chunk_bytes), metadata=conn.metadata)
        except grpc.RpcError as exc:
            details = describe_rpc_error(exc)
            retryable = (details.code in _TRANSPORT_CODES and not details.reason) \
                or details.reason in ("UPLOAD_OFFSET_MISMATCH", "UPLOAD_IN_PROGRESS", "NOT_READY")
            if not retryable:
                raise
            last_error = exc
    assert last_error is not None
    raise last_error


def _resume_point(conn: Connection, request_id: str) -> common_pb2.Job | int:
    """Where to resume: the finished job, or the bytes the gateway holds (0 when it has none)."""
    try:
        upload = conn.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id=request_id), metadata=conn.metadata,
                                     timeout=UNARY_TIMEOUT_S)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        if exc.code() in _TRANSPORT_CODES:
            return 0  # the next attempt finds out; a stale offset is answered with the right one
        raise
    if upload.state == gateway_pb2.UPLOAD_STATE_COMPLETE:
        return conn.get_job(upload.job)
    return upload.committed_bytes


def _upload_requests(path: Path, header: gateway_pb2.UploadHeader, offset: int, on_offset: Callable[[int], None],
                     chunk_bytes: int) -> Iterator[gateway_pb2.CreateJobRequest]:
    yield gateway_pb2.CreateJobRequest(header=header)
    on_offset(offset)
    with open(path, "rb") as handle:
        handle.seek(offset)
        while data := handle.read(chunk_bytes):
            yield gateway_pb2.CreateJobRequest(chunk=gateway_pb2.UploadChunk(offset=offset, data=data))
            offset += len(data)
            on_offset(offset)


# ---------------------------------------------------------------------------------------------
# Watch


def watch_job(conn: Connection, name: str, on_event: Callable[[gateway_pb2.JobEvent], None],
              after_seq: int = 0, reconnects: int = WATCH_RECONNECTS) -> common_pb2.Job:
    """Follows a job's events until it ends, reconnecting from the last seq seen; returns the job."""
    failures = 0
    while True:
        try:
            for event in conn.stub.WatchJob(gateway_pb2.WatchJobRequest(name=name, after_seq=after_seq), metadata=conn.metadata):
                after_seq, failures = event.seq, 0
                on_event(event)
                if event.type == gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED and event.state in TERMINAL:
                    return event.job if event.job.name else conn.get_job(name)
            job = conn.get_job(name)  # the stream ended: the job had already ended
            if job.state in TERMINAL:
                return job
        except grpc.RpcError as exc:
            if exc.code() not in _TRANSPORT_CODES or failures >= reconnects:
                raise
            failures += 1
            time.sleep(_backoff(failures - 1))


# ---------------------------------------------------------------------------------------------
# Download


def download_artifact(conn: Connection, artifact: common_pb2.Artifact, dest: Path,
                      on_bytes: Callable[[int], None] = lambda n: None, attempts: int = DOWNLOAD_ATTEMPTS) -> Path:
    """Downloads into dest.part (resuming what is there), checks size and SHA-256, renames to dest."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        offset = part.stat().st_size if part.exists() else 0
        if offset > artifact.size_bytes:
            part.unlink()
            offset = 0
        try:
            with open(part, "ab") as handle:
                request = gateway_pb2.DownloadArtifactRequest(name=artifact.name, offset=offset)
                for message in conn.stub.DownloadArtifact(request, metadata=conn.metadata):
                    if message.offset != offset:
                        raise DownloadError(f"{artifact.name}: the gateway sent bytes out of order")
                    handle.write(message.data)
                    offset += len(message.data)
                    on_bytes(len(message.data))
            break
        except grpc.RpcError as exc:
            if exc.code() not in _TRANSPORT_CODES or attempt == attempts - 1:
                raise
            time.sleep(_backoff(attempt))
    if part.stat().st_size != artifact.size_bytes or sha256_file(part) != artifact.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{artifact.name}: the download does not match the artifact's size and SHA-256")
    os.replace(part, dest)
    return dest


__all__ = ["Connection", "DownloadError", "download_artifact", "job_name", "sha256_file", "upload_video", "watch_job"]
