"""A small asyncio client for the gateway's tests, plus helpers to look at the data dir."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc

from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from mocap_common.rpc_errors import RpcErrorDetails, describe_rpc_error

CHUNK = 1024 * 1024
TERMINAL = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header(data: bytes, *, filename: str = "runner.mp4", request_id: str = "", sha256: str | None = None,
           options: common_pb2.JobOptions | None = None, resume_offset: int = 0, size: int | None = None) -> gateway_pb2.CreateJobRequest:
    return gateway_pb2.CreateJobRequest(header=gateway_pb2.UploadHeader(
        filename=filename, size_bytes=len(data) if size is None else size,
        sha256=sha256_of(data) if sha256 is None else sha256, request_id=request_id,
        options=options or common_pb2.JobOptions(), resume_offset=resume_offset))


def chunks(data: bytes, start: int = 0, size: int = CHUNK) -> list[gateway_pb2.CreateJobRequest]:
    return [gateway_pb2.CreateJobRequest(chunk=gateway_pb2.UploadChunk(offset=o, data=data[o:o + size]))
            for o in range(start, len(data), size)]


class Client:
    """GatewayService over an aio channel, with the test's tenant token."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=(("grpc.max_receive_message_length", 64 << 20),))
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def send(self, messages: Iterable[gateway_pb2.CreateJobRequest]) -> common_pb2.Job:
        async def stream() -> AsyncIterator[gateway_pb2.CreateJobRequest]:
            for m in messages:
                yield m

        return await self.stub.CreateJob(stream(), metadata=self.metadata, timeout=120)

    async def upload(self, data: bytes, **header_fields: object) -> common_pb2.Job:
        return await self.send([header(data, **header_fields), *chunks(data)])  # type: ignore[arg-type]

    async def get(self, name: str) -> common_pb2.Job:
        return await self.stub.GetJob(gateway_pb2.GetJobRequest(name=name), metadata=self.metadata, timeout=30)

    async def wait(self, name: str, states: Iterable[int] = TERMINAL, timeout_s: float = 60.0) -> common_pb2.Job:
        """Polls GetJob until the job is in one of `states` (a generous bound, not a timing claim)."""
        wanted = set(states)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            job = await self.get(name)
            if job.state in wanted:
                return job
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{name} still {common_pb2.JobState.Name(job.state)} after {timeout_s}s")
            await asyncio.sleep(0.05)

    async def events(self, name: str, after_seq: int = 0, limit: int | None = None) -> list[gateway_pb2.JobEvent]:
        got = []
        call = self.stub.WatchJob(gateway_pb2.WatchJobRequest(name=name, after_seq=after_seq), metadata=self.metadata, timeout=60)
        async for event in call:
            got.append(event)
            if limit is not None and len(got) >= limit:
                call.cancel()
                break
        return got

    async def download(self, name: str, offset: int = 0) -> tuple[common_pb2.Artifact, bytes]:
        artifact, parts = None, []
        async for message in self.stub.DownloadArtifact(gateway_pb2.DownloadArtifactRequest(name=name, offset=offset),
                                                        metadata=self.metadata, timeout=60):
            if message.HasField("artifact"):
                artifact = message.artifact
            parts.append(message.data)
        assert artifact is not None
        return artifact, b"".join(parts)


async def rpc_error(awaitable: object) -> RpcErrorDetails:
    """Awaits a call that must fail; returns its rich error."""
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return describe_rpc_error(exc)
    raise AssertionError("the call succeeded but should have failed")


def job_dirs(data_dir: Path) -> list[str]:
    jobs = data_dir / "jobs"
    return sorted(p.name for p in jobs.iterdir()) if jobs.exists() else []


_TABLES = ("jobs", "uploads", "events", "artifacts")
# The job store the gateways of the running test use: "" = SQLite in their data dir, else a
# PostgreSQL URL (set by the `database_url` fixture of tests/gateway/conftest.py).
_database_url = ""


def use_database(url: str) -> None:
    global _database_url
    _database_url = url


def database_url() -> str:
    return _database_url


def store_flags() -> list[str]:
    """The command-line flags that point a gateway process at the test's job store."""
    return ["--database-url", _database_url] if _database_url else []


def db_rows(data_dir: Path) -> dict[str, int]:
    """Rows per table of the gateway's store (read-only peek: 'no DB row left' checks)."""
    if _database_url:
        query = "SELECT " + ", ".join(f"(SELECT COUNT(*) FROM {t})" for t in _TABLES)
        out = subprocess.run(["psql", "-X", "-At", "-F", " ", "-d", _database_url, "-c", query],
                             capture_output=True, text=True, check=True).stdout.split()
        return dict(zip(_TABLES, map(int, out), strict=True))
    with sqlite3.connect(f"file:{data_dir / 'gateway.sqlite3'}?mode=ro", uri=True) as db:
        return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in _TABLES}
