"""A chunk over the documented limit (UploadChunk.data: 4 MiB) is INVALID_ARGUMENT with reason
CHUNK_TOO_LARGE and a BadRequest violation on chunk.data, and nothing of the upload is kept, up to
the gateway's transport limit; a message over even that is refused by gRPC itself (no details can
be attached) and still nothing is kept; and the CLI does not take gRPC's detail-less
RESOURCE_EXHAUSTED for "busy, retry later"."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest

from gateway import cli
from gateway.uploads import MAX_CHUNK_BYTES
from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.helpers import Client, chunks, db_rows, header, job_dirs, rpc_error
from tests.support import REPO, RUNNER_MP4

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


def _chunk(offset: int, size: int) -> gateway_pb2.CreateJobRequest:
    return gateway_pb2.CreateJobRequest(chunk=gateway_pb2.UploadChunk(offset=offset, data=b"\0" * size))


async def _nothing_kept(client: Client, data_dir, request_id: str) -> None:
    for _ in range(100):  # the upload settles right after the answer
        if db_rows(data_dir)["uploads"] == 0 and job_dirs(data_dir) == []:
            break
        await asyncio.sleep(0.05)
    assert db_rows(data_dir)["uploads"] == 0 and job_dirs(data_dir) == []
    gone = await rpc_error(client.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id=request_id)))
    assert gone.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("first_bytes", "size"), [
    (0, 70 * MiB),  # the fault run's chunk, as the first one
    (0, MAX_CHUNK_BYTES + 1),  # just over the documented limit
    (2 * MiB, 70 * MiB),  # after good chunks of a resumable upload
])
async def test_an_oversized_chunk_is_invalid_argument_and_leaves_nothing(client, runner_bytes, data_dir, first_bytes, size):
    request_id = f"big-{first_bytes}-{size}"
    messages = [header(runner_bytes, request_id=request_id, size=first_bytes + size),
                *chunks(b"\0" * first_bytes), _chunk(first_bytes, size)]
    refused = await rpc_error(client.send(messages))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.reason == "CHUNK_TOO_LARGE", refused
    assert [v.field for v in refused.violations] == ["chunk.data"]
    assert str(MAX_CHUNK_BYTES) in refused.violations[0].description
    await _nothing_kept(client, data_dir, request_id)


async def test_a_chunk_of_exactly_the_limit_is_accepted(client, data_dir):
    """The limit is inclusive, also far into a file (a larger offset makes the message larger)."""
    size = 10 + MAX_CHUNK_BYTES
    refused = await rpc_error(client.send([header(b"", request_id="edge-1", size=size, sha256=""),
                                           _chunk(0, 10), _chunk(10, MAX_CHUNK_BYTES)]))
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.reason == "NOT_A_VIDEO"  # read whole, then probed
    await _nothing_kept(client, data_dir, "edge-1")


async def test_a_message_over_the_transport_limit_leaves_nothing(client, runner_bytes, data_dir):
    """Above the gateway's transport limit gRPC refuses the message before the handler sees it: a
    bare RESOURCE_EXHAUSTED. The upload (with a request_id, nothing committed) is still removed."""
    messages = [header(runner_bytes, request_id="huge-1", size=129 * MiB), _chunk(0, 129 * MiB)]
    refused = await rpc_error(client.send(messages))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not refused.reason and refused.retry_after_s is None
    await _nothing_kept(client, data_dir, "huge-1")


class _SmallLimitGateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Stands in for a gateway behind a proxy (or an older one) whose gRPC receive limit is smaller
    than the CLI's chunks: gRPC core itself answers RESOURCE_EXHAUSTED, with no ErrorInfo."""

    def __init__(self) -> None:
        self.calls = 0

    async def CreateJob(self, request_iterator, context):
        self.calls += 1
        async for _ in request_iterator:
            pass
        return common_pb2.Job(name="jobs/j-aaaaaaaaaaaaaaaaaaaa")

    async def GetUpload(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no upload")


async def test_the_cli_does_not_read_grpcs_bare_resource_exhausted_as_busy():
    servicer = _SmallLimitGateway()
    server = grpc.aio.server(options=(("grpc.max_receive_message_length", 256 * 1024),))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MOCAP_GATEWAY_ADDR": f"127.0.0.1:{port}"}
        env.pop("MOCAP_TOKEN", None)
        run = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway.cli", "submit", str(RUNNER_MP4), "-q"],
                                      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    finally:
        await server.stop(0)
    assert run.returncode == cli.EXIT_USAGE, (run.returncode, run.stderr)
    assert "message-size limit" in run.stderr and "not a busy gateway" in run.stderr
    assert servicer.calls == 1  # refused once, not retried as if the gateway were busy
