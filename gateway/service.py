"""The job API as the domain sees it: every GatewayService method for one tenant, no gRPC.

A tenant only ever finds its own jobs: another tenant's job is reported exactly like a job that
does not exist (NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.events import EventHub, watch
from gateway.jobs import ACTIVE_STATES, SUCCEEDED, JobRecord, UploadRecord, parse_artifact_name, parse_job_name
from gateway.layout import JobDir
from gateway.orchestrator import Orchestrator
from gateway.store import JobStore
from gateway.uploads import Uploads
from mocap.v1 import common_pb2, gateway_pb2
from mocap_common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, OutOfRange

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DOWNLOAD_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ArtifactPiece:
    """One message of a download: `artifact` on the first only."""

    artifact: common_pb2.Artifact | None
    offset: int
    data: bytes


class JobService:
    """Create, get, list, cancel, delete, watch jobs and download their artifacts."""

    def __init__(self, store: JobStore, hub: EventHub, uploads: Uploads, orchestrator: Orchestrator, jobs_root: Path) -> None:
        self._store = store
        self._hub = hub
        self._uploads = uploads
        self._orchestrator = orchestrator
        self._jobs_root = jobs_root

    async def create_job(self, tenant: str, requests: AsyncIterator[gateway_pb2.CreateJobRequest],
                         settle_short_end: Callable[[], Awaitable[None]]) -> JobRecord:
        return await self._uploads.create_job(tenant, requests, settle_short_end)

    async def get_upload(self, tenant: str, request_id: str, name: str = "") -> UploadRecord:
        return await self._uploads.get(tenant, request_id, name)

    async def get_job(self, tenant: str, name: str, field_path: str = "name") -> JobRecord:
        job_id = parse_job_name(name, field_path)
        job = await self._store.get_job(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job {name} not found")
        return job

    async def list_jobs(self, tenant: str, page_size: int, page_token: str, state: int) -> tuple[list[JobRecord], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must be >= 0", violations=[FieldViolation("page_size", "must be >= 0")])
        if state not in common_pb2.JobState.values():
            raise InvalidArgument(f"unknown job state {state}", violations=[FieldViolation("state", "unknown JobState value")])
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token, state) if page_token else None
        jobs = await self._store.list_jobs(tenant, state, limit + 1, after)
        if len(jobs) <= limit:
            return jobs, ""
        jobs = jobs[:limit]
        return jobs, _encode_page_token(jobs[-1], state)

    async def cancel_job(self, tenant: str, name: str) -> JobRecord:
        job = await self.get_job(tenant, name)
        if job.state in ACTIVE_STATES:
            await self._orchestrator.cancel(job.job_id)
        return await self.get_job(tenant, name)

    async def delete_job(self, tenant: str, name: str) -> None:
        job = await self.get_job(tenant, name)
        if job.state in ACTIVE_STATES:
            raise FailedPrecondition(f"job {name} is {common_pb2.JobState.Name(job.state)}: cancel it first",
                                     reason="JOB_STATE")
        # The store first: a crash before the files go leaves an orphan directory for the sweep.
        await self._store.delete_job(job.job_id)
        JobDir(self._jobs_root, job.job_id).remove()

    async def watch_job(self, tenant: str, name: str, after_seq: int) -> AsyncIterator[gateway_pb2.JobEvent]:
        if after_seq < 0:
            raise InvalidArgument("after_seq must be >= 0", violations=[FieldViolation("after_seq", "must be >= 0")])
        job = await self.get_job(tenant, name)
        async for event in watch(self._store, self._hub, job.job_id, after_seq):
            yield event

    async def read_artifact(self, tenant: str, name: str, offset: int) -> AsyncIterator[ArtifactPiece]:
        job_id, artifact_id = parse_artifact_name(name)
        job = await self.get_job(tenant, f"jobs/{job_id}")
        if job.state != SUCCEEDED:
            raise FailedPrecondition(f"job {job.name} is {common_pb2.JobState.Name(job.state)}; artifacts are "
                                     "available once it SUCCEEDED", reason="JOB_STATE")
        artifact = next((a for a in job.artifacts if a.name == name), None)
        if artifact is None:
            raise NotFound(f"artifact {name} not found")
        if offset < 0:
            raise InvalidArgument("offset must be >= 0", violations=[FieldViolation("offset", "must be >= 0")])
        if offset > artifact.size_bytes:
            raise OutOfRange(f"offset {offset} is beyond the end of the artifact ({artifact.size_bytes} bytes)",
                             reason="OFFSET_OUT_OF_RANGE", metadata={"size_bytes": artifact.size_bytes})
        path = JobDir(self._jobs_root, job_id).artifact(artifact_id)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {name} not found") from None
        with handle:
            handle.seek(offset)
            first: common_pb2.Artifact | None = artifact
            while True:
                data = await asyncio.to_thread(handle.read, DOWNLOAD_CHUNK_BYTES)
                if data or first is not None:
                    yield ArtifactPiece(first, offset, data)
                if not data:
                    return
                first = None
                offset += len(data)


def _encode_page_token(last: JobRecord, state: int) -> str:
    raw = json.dumps({"c": last.create_us, "j": last.job_id, "s": state}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, state: int) -> tuple[int, str]:
    bad = InvalidArgument("invalid page_token", violations=[FieldViolation("page_token", "is not a token from ListJobs")])
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        create_us, job_id, token_state = int(data["c"]), str(data["j"]), int(data["s"])
    except (ValueError, KeyError, TypeError):
        raise bad from None
    if token_state != state:
        raise InvalidArgument("page_token was made for another state filter",
                              violations=[FieldViolation("page_token", "the other fields must match the call that produced it")])
    return create_us, job_id
