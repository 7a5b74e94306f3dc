"""CreateJob: a streamed upload becomes a job, or is refused leaving nothing behind.

    header ──▶ validate ──▶ same request_id seen? ──▶ same content+options job? ──▶ admit (active
    jobs, disk) ──▶ chunks → data/jobs/{id}/upload.part (SHA-256 while streaming, fsync every
    `upload_commit_bytes`) ──▶ size, checksum ──▶ duplicate? ──▶ probe ──▶ input.<ext> ──▶ job QUEUED

What is kept when a stream does not finish:
- a *broken* stream (the client cancelled or vanished) with a request_id keeps its bytes, fsynced
  and recorded, so the client can resume from `GetUpload().committed_bytes` until the upload
  retention ends — if it has any: a stream that broke before its first byte leaves nothing
  (resuming it would be starting over), and so does a broken stream without a request_id
  (nobody can resume it);
- a stream that ends normally but short, or any invalid input (a chunk over MAX_CHUNK_BYTES
  included), removes the upload's directory and row: a refused upload leaves nothing on disk or
  in the store.

Message limits: a chunk carries at most MAX_CHUNK_BYTES (the documented limit, CHUNK_TOO_LARGE
above it). The gateway's transport accepts messages up to TRANSPORT_RECEIVE_LIMIT_BYTES, well above
that, so an oversized chunk reaches the handler and gets INVALID_ARGUMENT with a reason; only a
message over the transport limit is refused by gRPC itself (RESOURCE_EXHAUSTED, no details), which
the handler cannot tell from a broken stream (see above for what that keeps).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import functools
import hashlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import Counter

from gateway.config import GatewayConfig
from gateway.jobs import (
    QUEUED,
    SUCCEEDED,
    JobRecord,
    UploadRecord,
    canonical_options,
    new_job_id,
    now_us,
    options_key,
    parse_artifact_name,
    parse_upload_name,
)
from gateway.layout import JobDir
from gateway.probe import ProbeError, probe_video
from gateway.store import JobStore, RequestIdTaken, TooManyActive
from mocap.v1 import common_pb2, gateway_pb2
from mocap_common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from mocap_common.files import fsync_dir
from mocap_common.limits import REQUEST_ID_RULE, is_valid_request_id
from mocap_common.logs import get_logger
from mocap_common.procs import finish_uncancellable

log = get_logger(__name__)

UPLOAD_BYTES = Counter("mocap_gateway_upload_bytes_total", "Video bytes received by CreateJob.")
UPLOADS_REFUSED = Counter("mocap_gateway_uploads_refused_total", "Uploads refused, by reason.", ["reason"])
UPLOADS_INTERRUPTED = Counter("mocap_gateway_uploads_interrupted_total", "Upload streams that broke (kept for resume when possible).")

MAX_CHUNK_BYTES = 4 * 1024 * 1024  # documented on UploadChunk.data in gateway.proto
# The gateway's gRPC receive limit per message (gateway.app passes it to ServiceHost): 32 × the
# chunk limit plus room for framing, so every chunk size a client is likely to configure by
# mistake (up to 128 MiB, the whole of a short clip in one chunk) is answered CHUNK_TOO_LARGE by
# the handler, while one message still cannot make the gateway hold more than this. Above it gRPC
# refuses the message itself, without details. Documented on CreateJob in gateway.proto.
TRANSPORT_RECEIVE_LIMIT_BYTES = 128 * 1024 * 1024 + 64 * 1024
# Bytes an UploadChunk message may have besides its data (offset, tags, lengths): a message larger
# than MAX_CHUNK_BYTES + this is refused before its data is copied out of the message.
_CHUNK_FRAMING_BYTES = 32
MAX_FILENAME_CHARS = 255
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TOO_MANY_JOBS_RETRY_S = 30.0
NO_STORAGE_RETRY_S = 60.0
IN_PROGRESS_RETRY_S = 1.0


@dataclass(frozen=True)
class UploadRequest:
    """A validated header."""

    filename: str
    size_bytes: int
    sha256: str  # "" when not declared
    request_id: str  # "" when not given
    options: common_pb2.JobOptions  # canonical
    resume_offset: int


def validate_header(header: gateway_pb2.UploadHeader, max_upload_bytes: int) -> UploadRequest:
    """Checks every header field; INVALID_ARGUMENT naming each bad field."""
    violations: list[FieldViolation] = []
    name = header.filename
    if not name:
        violations.append(FieldViolation("header.filename", "must not be empty"))
    elif len(name) > MAX_FILENAME_CHARS:
        violations.append(FieldViolation("header.filename", f"must be at most {MAX_FILENAME_CHARS} characters"))
    elif "\x00" in name or "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
        violations.append(FieldViolation("header.filename", "must be a plain file name: no path separators, NUL or control characters"))
    if header.size_bytes <= 0:
        violations.append(FieldViolation("header.size_bytes", "must be > 0"))
    sha = header.sha256.lower()
    if sha and not _SHA256_RE.match(sha):
        violations.append(FieldViolation("header.sha256", "must be 64 hex characters"))
    if header.request_id and not is_valid_request_id(header.request_id):
        violations.append(FieldViolation("header.request_id", REQUEST_ID_RULE))
    if header.resume_offset < 0:
        violations.append(FieldViolation("header.resume_offset", "must be >= 0"))
    elif header.resume_offset and not header.request_id:
        violations.append(FieldViolation("header.resume_offset", "resuming needs the upload's request_id"))
    try:
        options = canonical_options(header.options)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    if violations:
        raise InvalidArgument("invalid upload header", violations=violations)
    if header.size_bytes > max_upload_bytes:
        raise InvalidArgument(f"the video is larger than this server accepts ({max_upload_bytes} bytes)",
                              reason="UPLOAD_TOO_LARGE",
                              violations=[FieldViolation("header.size_bytes", f"must be at most {max_upload_bytes}")])
    return UploadRequest(name, header.size_bytes, sha, header.request_id, options, header.resume_offset)


def validate_request_id(request_id: str, field_path: str = "request_id") -> str:
    if not is_valid_request_id(request_id):
        raise InvalidArgument("invalid request_id", violations=[FieldViolation(field_path, REQUEST_ID_RULE)])
    return request_id


class PartialFile:
    """An upload's bytes on disk, hashed as they are written.

    Writing and hashing run in a thread of this upload's own, in order, while the event loop
    receives the next chunks; the loop waits only when `MAX_QUEUED_WRITES` chunks are queued. An
    fsync at a commit point is queued like a write, so receiving goes on while it runs.
    """

    MAX_QUEUED_WRITES = 8

    def __init__(self, handle: BinaryIO, digest: Any, size: int, worker: concurrent.futures.ThreadPoolExecutor) -> None:
        self._handle = handle
        self._digest = digest
        self.size = size  # bytes written (touched by the worker thread only while ops are queued)
        self._worker = worker
        self._queued: collections.deque[concurrent.futures.Future[Any]] = collections.deque()

    @classmethod
    async def open(cls, path: Path, keep_bytes: int) -> "PartialFile":
        """Opens `path` keeping its first `keep_bytes` (the recorded durable part) and hashing them."""
        worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-io")
        try:
            return await _settled(worker.submit(cls._open_sync, path, keep_bytes, worker))
        except BaseException:
            worker.shutdown(wait=False)
            raise

    @classmethod
    def _open_sync(cls, path: Path, keep_bytes: int, worker: concurrent.futures.ThreadPoolExecutor) -> "PartialFile":
        handle = open(path, "r+b" if path.exists() else "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            handle.truncate(keep_bytes)
            digest = hashlib.sha256()
            remaining = keep_bytes
            while remaining:
                block = handle.read(min(remaining, 8 << 20))
                if not block:
                    raise OSError(f"the partial upload is shorter than its recorded {keep_bytes} bytes")
                digest.update(block)
                remaining -= len(block)
            handle.seek(keep_bytes)
        except BaseException:
            handle.close()
            raise
        return cls(handle, digest, keep_bytes, worker)

    async def write(self, data: bytes) -> None:
        """Queues `data`; waits only while too many writes are queued (and raises their errors)."""
        self._queued.append(self._worker.submit(self._write_sync, data))
        while len(self._queued) > self.MAX_QUEUED_WRITES:
            await _settled(self._queued.popleft())

    def _write_sync(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._handle.write(view):]
        self._digest.update(data)
        self.size += len(data)

    def commit(self) -> "asyncio.Future[int]":
        """Queues an fsync after the writes queued so far; the future gives the durable size."""
        future = self._worker.submit(self._sync_sync)
        self._queued.append(future)
        return asyncio.wrap_future(future)

    async def sync(self) -> int:
        """Makes every written byte durable; returns the durable size."""
        self.commit()
        while self._queued:
            durable = await _settled(self._queued.popleft())
        return durable

    def _sync_sync(self) -> int:
        os.fsync(self._handle.fileno())
        return self.size

    def hexdigest(self) -> str:
        """The SHA-256 of the bytes written; call after sync() (writes may still be queued)."""
        assert not self._queued, "hexdigest() while writes are queued"
        return self._digest.hexdigest()

    async def close(self) -> None:
        """Lets the queued writes finish (even when cancelled meanwhile) and closes the file."""
        while self._queued:
            try:
                await _settled(self._queued.popleft())
            except Exception:  # noqa: BLE001 - only the thread being done with the file matters here
                pass
        await _settled(self._worker.submit(self._handle.close))
        self._worker.shutdown(wait=False)


async def _settled(future: concurrent.futures.Future[Any]) -> Any:
    """The future's result. A cancelled caller still waits for it (the cancellation is re-raised
    afterwards): the thread may be using the file, and a write the thread has not started yet
    must not be dropped while the bytes count as sent."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


@dataclass
class _Live:
    tenant: str
    remaining_bytes: int


class Uploads:
    """Turns CreateJob streams into jobs; answers GetUpload.

    An upload being streamed holds a stream lease in the store (owner = this replica, renewed by
    a heartbeat every third of `stream_ttl_s`): the tenant's limit counts it on every replica, a
    resume of it that reaches another replica is refused UPLOAD_IN_PROGRESS, and no replica's
    sweep touches its files. A replica killed mid-stream stops renewing: after the TTL the upload
    can be resumed anywhere (its bytes are on the shared data directory)."""

    def __init__(self, config: GatewayConfig, store: JobStore, on_job_created: Callable[[JobRecord], None], *,
                 owner: str = "gateway", stream_ttl_s: float = 10.0) -> None:
        self._config = config
        self._store = store
        self._on_job_created = on_job_created
        self._owner = owner
        self._stream_ttl_s = stream_ttl_s
        self._live: dict[str, _Live] = {}  # upload_id → streaming now
        self._commits: dict[str, set[asyncio.Task[None]]] = {}  # upload_id → commit records being written
        self._idle = asyncio.Event()  # set while no upload is streaming or settling
        self._idle.set()
        self._heartbeat: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._renew_streams(), name="upload-stream-heartbeat")

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Waits until every upload has settled (kept for resume or removed). gRPC's server stop
        cancels handlers without waiting for their cleanup; this runs before the store closes."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("uploads still settling at shutdown", uploads=len(self._live))
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)

    def _stream_expiry(self) -> int:
        return now_us() + int(self._stream_ttl_s * 1_000_000)

    async def _renew_streams(self) -> None:
        while True:
            await asyncio.sleep(self._stream_ttl_s / 3)
            if self._live:
                try:
                    await self._store.renew_upload_streams(self._owner, list(self._live), self._stream_expiry())
                except Exception:  # noqa: BLE001 - the next beat tries again
                    log.exception("renewing upload stream leases failed")

    def is_live(self, upload_id: str) -> bool:
        """Whether a CreateJob call is streaming this upload now."""
        return upload_id in self._live

    # GetUpload ---------------------------------------------------------------------------------

    async def get(self, tenant: str, request_id: str = "", name: str = "") -> UploadRecord:
        """The tenant's upload by the request_id it was started with, or by its resource name
        ("uploads/{upload}"): exactly one of the two. Another tenant's upload is not found."""
        if request_id and name:
            raise InvalidArgument("set request_id or name, not both",
                                  violations=[FieldViolation("name", "must be empty when request_id is set")])
        if name:
            upload = await self._store.get_upload(parse_upload_name(name))
            if upload is None or upload.tenant != tenant:
                raise NotFound(f"upload {name} not found")
            return upload
        if not request_id:
            raise InvalidArgument("set request_id or name",
                                  violations=[FieldViolation("request_id", "set it (or name) to say which upload")])
        upload = await self._store.find_upload(tenant, validate_request_id(request_id))
        if upload is None:
            raise NotFound(f"no upload with request_id {request_id!r}")
        return upload

    # CreateJob ---------------------------------------------------------------------------------

    async def create_job(self, tenant: str, requests: AsyncIterator[gateway_pb2.CreateJobRequest],
                         settle_short_end: Callable[[], Awaitable[None]]) -> JobRecord:
        """Consumes a CreateJob stream. `settle_short_end` is awaited when the stream ends before
        the declared size; the transport raises CancelledError from it when the stream was in
        fact broken by the client (gRPC reports a peer's cancel as an end of stream first)."""
        try:
            first = await anext(requests, None)
            if first is None:
                raise InvalidArgument("the upload stream was empty: send a header, then chunks", reason="EMPTY_UPLOAD")
            if first.WhichOneof("part") != "header":
                raise InvalidArgument("the first message must be a header", reason="HEADER_REQUIRED",
                                      violations=[FieldViolation("header", "the first message must carry the header")])
            request = validate_header(first.header, self._config.max_upload_bytes)
            existing = await self._resolve_request_id(tenant, request)
            if isinstance(existing, JobRecord):
                return existing
            duplicate = await self._deliverable_duplicate(tenant, request.sha256, options_key(request.options)) \
                if request.sha256 else None
            if duplicate is not None:
                if existing is not None:
                    await self._discard(existing.upload_id)
                return await self._answer_with(duplicate, tenant, request)
            self._check_disk(request, existing)
            upload = await self._resume(existing) if existing is not None else await self._start(tenant, request)
        except ServiceError as exc:
            UPLOADS_REFUSED.labels(exc.reason).inc()
            raise
        return await self._receive(upload, request, requests, settle_short_end)

    async def _resolve_request_id(self, tenant: str, request: UploadRequest) -> JobRecord | UploadRecord | None:
        """The job a repeated request_id already made, the interrupted upload it resumes, or None."""
        if not request.request_id:
            return None
        upload = await self._store.find_upload(tenant, request.request_id)
        if upload is None:
            if request.resume_offset:
                raise FailedPrecondition("nothing to resume: no upload with this request_id (it may have expired); "
                                         "start again from offset 0", reason="UPLOAD_OFFSET_MISMATCH",
                                         metadata={"committed_bytes": 0})
            return None
        differs = upload.size_bytes != request.size_bytes or upload.options_key != options_key(request.options)
        if upload.complete:
            job = await self._store.get_job(upload.job_id)
            if job is None:  # deleted meanwhile: the request_id is free again
                await self._store.delete_upload(upload.upload_id)
                return None
            if differs or (request.sha256 and request.sha256 != job.sha256):
                raise _reused(request.request_id)
            return job
        if differs or request.sha256 != upload.declared_sha256:
            raise _reused(request.request_id)
        if upload.upload_id in self._live or upload.stream_expire_us > now_us():
            raise _in_progress()
        if request.resume_offset not in (0, upload.committed_bytes):
            raise FailedPrecondition(f"resume from byte {upload.committed_bytes}, not {request.resume_offset}",
                                     reason="UPLOAD_OFFSET_MISMATCH",
                                     metadata={"committed_bytes": upload.committed_bytes})
        if request.resume_offset == 0 and upload.committed_bytes:
            upload = replace(upload, committed_bytes=0)  # the client starts over
            await self._store.set_upload_committed(upload.upload_id, 0, upload.expire_us)
        return upload

    async def _deliverable_duplicate(self, tenant: str, sha256: str, key: str) -> JobRecord | None:
        """The job of the same content and options, if its results can still be delivered: a
        SUCCEEDED job whose artifact files are gone (lost disk, manual cleanup) is no answer, so
        the upload becomes a new job instead of a job whose downloads fail NOT_FOUND."""
        job = await self._store.find_duplicate(tenant, sha256, key)
        if job is None or job.state != SUCCEEDED:
            return job
        job_dir = JobDir(self._config.jobs_dir, job.job_id)
        for artifact in job.artifacts:
            path = job_dir.artifact(parse_artifact_name(artifact.name)[1])
            if not path.is_file() or path.stat().st_size != artifact.size_bytes:
                log.warning("duplicate's artifacts are missing; starting a new job", job=job.job_id,
                            artifact=artifact.name)
                return None
        return job

    async def _answer_with(self, job: JobRecord, tenant: str, request: UploadRequest) -> JobRecord:
        """Answers an upload with an existing job of the same content, remembering its request_id."""
        if request.request_id:
            upload_id = new_job_id()
            try:
                await self._store.insert_upload(self._record(upload_id, tenant, request))
            except RequestIdTaken:  # a concurrent call with the same request_id got there first
                raise _in_progress() from None
            await self._store.complete_upload_as(upload_id, job.job_id)
        log.info("duplicate upload answered with existing job", job=job.job_id)
        return job

    def _too_many(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"this tenant already has {self._config.max_active_jobs_per_tenant} active jobs or uploads; "
            "wait for one to finish", reason="TOO_MANY_ACTIVE_JOBS", retry_after_s=TOO_MANY_JOBS_RETRY_S)

    def _check_disk(self, request: UploadRequest, resuming: UploadRecord | None) -> None:
        needed = request.size_bytes - (resuming.committed_bytes if resuming and request.resume_offset else 0)
        reserved = sum(u.remaining_bytes for u in self._live.values())
        self._config.jobs_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self._config.jobs_dir).free
        if free - reserved - needed < self._config.min_free_bytes:
            raise ResourceExhausted("the server is short of disk space; try again later",
                                    reason="INSUFFICIENT_STORAGE", retry_after_s=NO_STORAGE_RETRY_S)

    async def _start(self, tenant: str, request: UploadRequest) -> UploadRecord:
        """Records a new upload (the tenant's limit checked in the same transaction), then makes its
        directory: a directory without a row is always an orphan, whichever replica sweeps."""
        upload = replace(self._record(new_job_id(), tenant, request), stream_owner=self._owner,
                         stream_expire_us=self._stream_expiry())
        try:
            await self._store.insert_upload(upload, max_active=self._config.max_active_jobs_per_tenant)
        except TooManyActive:
            raise self._too_many() from None
        except RequestIdTaken:  # a concurrent call (here or on another replica) started it first
            raise _in_progress() from None
        try:
            JobDir(self._config.jobs_dir, upload.upload_id).create()
        except BaseException:
            await finish_uncancellable(self._store.delete_upload(upload.upload_id))
            raise
        return upload

    async def _resume(self, upload: UploadRecord) -> UploadRecord:
        """Takes the stream lease of an interrupted upload (any replica may have streamed it)."""
        try:
            claimed = await self._store.claim_upload_stream(upload.upload_id, self._owner, self._stream_expiry(),
                                                            max_active=self._config.max_active_jobs_per_tenant)
        except TooManyActive:
            raise self._too_many() from None
        if not claimed:
            raise _in_progress()
        return upload

    def _record(self, upload_id: str, tenant: str, request: UploadRequest) -> UploadRecord:
        now = now_us()
        return UploadRecord(
            upload_id=upload_id, tenant=tenant, request_id=request.request_id, display_filename=request.filename,
            size_bytes=request.size_bytes, declared_sha256=request.sha256, options=request.options,
            committed_bytes=0, create_us=now, expire_us=now + self._retention_us,
        )

    @property
    def _retention_us(self) -> int:
        return int(self._config.upload_retention_s * 1_000_000)

    async def _receive(self, upload: UploadRecord, request: UploadRequest,
                       requests: AsyncIterator[gateway_pb2.CreateJobRequest],
                       settle_short_end: Callable[[], Awaitable[None]]) -> JobRecord:
        job_dir = JobDir(self._config.jobs_dir, upload.upload_id)
        self._live[upload.upload_id] = _Live(upload.tenant, upload.size_bytes - upload.committed_bytes)
        self._idle.clear()
        part: PartialFile | None = None
        keep = False
        try:
            part = await PartialFile.open(job_dir.partial, upload.committed_bytes)
            await self._receive_chunks(upload, part, requests, settle_short_end)
            await part.sync()
            digest = part.hexdigest()
            return await self._finish(upload, request, job_dir, digest)
        except asyncio.CancelledError:
            UPLOADS_INTERRUPTED.inc()
            keep = bool(upload.request_id)
            raise
        except ServiceError as exc:
            keep = bool(upload.request_id) and exc.reason == "UPLOAD_OFFSET_MISMATCH"
            UPLOADS_REFUSED.labels(exc.reason).inc()
            raise
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            UPLOADS_REFUSED.labels("INSUFFICIENT_STORAGE").inc()
            raise ResourceExhausted("the server ran out of disk space; try again later",
                                    reason="INSUFFICIENT_STORAGE", retry_after_s=NO_STORAGE_RETRY_S) from None
        finally:
            # Still marked live while settling, so a resume cannot touch the file before it is closed.
            try:
                await finish_uncancellable(self._settle(upload, part, keep))
            finally:
                self._live.pop(upload.upload_id, None)
                self._commits.pop(upload.upload_id, None)
                if not self._live:
                    self._idle.set()

    def _record_commit(self, upload_id: str, durable: "asyncio.Future[int]") -> None:
        """A commit point's fsync finished: from now on a resume can start at its offset."""
        if not durable.cancelled() and durable.exception() is None:
            pending = self._commits.setdefault(upload_id, set())
            task = asyncio.ensure_future(
                self._store.set_upload_committed(upload_id, durable.result(), now_us() + self._retention_us))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _settle(self, upload: UploadRecord, part: PartialFile | None, keep: bool) -> None:
        """After the stream: keep the durable bytes for a resume, or remove every trace; the
        stream lease ends either way."""
        # Commit records still being written land before the final one, never after it.
        await asyncio.gather(*self._commits.get(upload.upload_id, ()), return_exceptions=True)
        if part is not None:
            if keep:
                committed = await part.sync()
                keep = committed > 0  # nothing arrived: nothing to resume (a resume from 0 starts over)
                if keep:
                    await self._store.set_upload_committed(upload.upload_id, committed, now_us() + self._retention_us)
                    log.info("upload interrupted; kept for resume", upload=upload.upload_id, committed_bytes=committed)
            await part.close()
        elif keep:
            keep = upload.committed_bytes > 0
        current = await self._store.get_upload(upload.upload_id)
        if not keep and current is not None and not current.complete:
            await self._discard(upload.upload_id)
            log.info("unfinished upload removed", upload=upload.upload_id, had_request_id=bool(upload.request_id))
        elif current is not None and not current.complete:
            await self._store.release_upload_stream(upload.upload_id, self._owner)

    async def _discard(self, upload_id: str) -> None:
        await self._store.delete_upload(upload_id)
        JobDir(self._config.jobs_dir, upload_id).remove()

    async def _receive_chunks(self, upload: UploadRecord, part: PartialFile,
                              requests: AsyncIterator[gateway_pb2.CreateJobRequest],
                              settle_short_end: Callable[[], Awaitable[None]]) -> None:
        size, commit_every = upload.size_bytes, self._config.upload_commit_bytes
        offset = last_commit = part.size
        live = self._live[upload.upload_id]
        async for message in requests:
            kind = message.WhichOneof("part")
            if kind == "header":
                raise InvalidArgument("a second header arrived; send one header, then chunks", reason="HEADER_REQUIRED",
                                      violations=[FieldViolation("header", "only the first message may be a header")])
            if kind != "chunk":
                raise InvalidArgument("a message carried neither header nor chunk",
                                      violations=[FieldViolation("part", "must be set")])
            chunk = message.chunk
            if chunk.ByteSize() > MAX_CHUNK_BYTES + _CHUNK_FRAMING_BYTES:  # sized without copying the data
                raise _chunk_too_large()
            data = chunk.data  # each access of a bytes field copies it: once per message
            if len(data) > MAX_CHUNK_BYTES:
                raise _chunk_too_large()
            if chunk.offset != offset:
                committed = await part.sync() if upload.request_id else 0
                raise FailedPrecondition(f"chunk offset {chunk.offset} is not where the upload stands ({offset})",
                                         reason="UPLOAD_OFFSET_MISMATCH", metadata={"committed_bytes": committed})
            if offset + len(data) > size:
                raise InvalidArgument(f"more bytes arrived than the declared {size}", reason="SIZE_MISMATCH",
                                      violations=[FieldViolation("header.size_bytes", "is smaller than the bytes sent")])
            await part.write(data)
            offset += len(data)
            live.remaining_bytes = size - offset
            UPLOAD_BYTES.inc(len(data))
            if offset - last_commit >= commit_every and offset < size:
                last_commit = offset
                part.commit().add_done_callback(functools.partial(self._record_commit, upload.upload_id))
        if offset < size:
            await settle_short_end()
            raise InvalidArgument(f"the stream ended after {offset} of the declared {size} bytes", reason="SIZE_MISMATCH",
                                  violations=[FieldViolation("header.size_bytes", f"declared {size}, received {offset}")])

    async def _finish(self, upload: UploadRecord, request: UploadRequest, job_dir: JobDir, digest: str) -> JobRecord:
        if upload.declared_sha256 and digest != upload.declared_sha256:
            raise InvalidArgument("the bytes received do not match the declared SHA-256", reason="CHECKSUM_MISMATCH",
                                  violations=[FieldViolation("header.sha256", "differs from the SHA-256 of the bytes received")])
        key = upload.options_key
        duplicate = await self._deliverable_duplicate(upload.tenant, digest, key)
        if duplicate is None:
            try:
                probe = await asyncio.to_thread(probe_video, job_dir.partial)
            except ProbeError as exc:
                raise InvalidArgument(exc.message, reason=exc.reason,
                                      violations=[FieldViolation("chunk.data", exc.message)]) from None
            self._check_limits(probe.duration_s, probe.width, probe.height)
            duplicate = await self._deliverable_duplicate(upload.tenant, digest, key)  # one may have finished meanwhile
        if duplicate is not None:
            await self._store.complete_upload_as(upload.upload_id, duplicate.job_id)
            job_dir.remove()
            log.info("duplicate upload answered with existing job", job=duplicate.job_id)
            return duplicate
        input_name = f"input.{probe.extension}"
        os.replace(job_dir.partial, job_dir.input(input_name))
        fsync_dir(job_dir.path)
        job = JobRecord(
            job_id=upload.upload_id, tenant=upload.tenant, state=QUEUED, display_filename=upload.display_filename,
            size_bytes=upload.size_bytes, sha256=digest, options=upload.options, input_name=input_name,
            video=common_pb2.VideoInfo(container=probe.container, codec=probe.codec, width=probe.width,
                                       height=probe.height, frame_count=probe.frame_count, fps=probe.fps,
                                       duration_seconds=probe.duration_s),
            create_us=now_us(), request_id=upload.request_id,
        )
        created = await self._store.create_job_from_upload(upload.upload_id, job)
        if created.job_id != job.job_id:  # another replica made the same job meanwhile: answer with it
            job_dir.remove()
            log.info("duplicate upload answered with existing job", job=created.job_id)
            return created
        job = created
        log.info("job created", job=job.job_id, size_bytes=job.size_bytes, frames=probe.frame_count)
        self._on_job_created(job)
        return job

    def _check_limits(self, duration_s: float, width: int, height: int) -> None:
        cfg = self._config
        if duration_s > cfg.max_duration_s:
            raise InvalidArgument(f"the video is {duration_s:.1f} s long; this server accepts at most {cfg.max_duration_s:g} s",
                                  reason="VIDEO_TOO_LONG",
                                  violations=[FieldViolation("chunk.data", f"duration must be at most {cfg.max_duration_s:g} s")])
        if width * height > cfg.max_frame_pixels:
            raise InvalidArgument(f"the video is {width}×{height}; this server accepts at most {cfg.max_frame_pixels} pixels per frame",
                                  reason="RESOLUTION_TOO_HIGH",
                                  violations=[FieldViolation("chunk.data", f"frames must have at most {cfg.max_frame_pixels} pixels")])
        # A sliver of a frame (16000×16) costs the tracker as much as its long side, and no camera makes one.
        if max(width, height) > cfg.max_aspect_ratio * min(width, height):
            raise InvalidArgument(f"the video is {width}×{height}; this server accepts frames of at most {cfg.max_aspect_ratio:g}:1 "
                                  "either way", reason="UNSUPPORTED_ASPECT_RATIO",
                                  violations=[FieldViolation("chunk.data", f"width/height and height/width must be at most {cfg.max_aspect_ratio:g}")])


def _chunk_too_large() -> InvalidArgument:
    return InvalidArgument(f"a chunk carried more than {MAX_CHUNK_BYTES} bytes; send the video in chunks of at most "
                           f"{MAX_CHUNK_BYTES // (1024 * 1024)} MiB", reason="CHUNK_TOO_LARGE",
                           violations=[FieldViolation("chunk.data", f"must be at most {MAX_CHUNK_BYTES} bytes")])


def _in_progress() -> Aborted:
    return Aborted("this upload is already streaming on another call; retry shortly",
                   reason="UPLOAD_IN_PROGRESS", retry_after_s=IN_PROGRESS_RETRY_S)


def _reused(request_id: str) -> AlreadyExists:
    return AlreadyExists(f"request_id {request_id!r} was used for a different upload (size, checksum or options)",
                         reason="REQUEST_ID_REUSED")
