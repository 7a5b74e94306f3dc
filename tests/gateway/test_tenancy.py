"""Bearer tokens map to tenants; a tenant never sees or touches another tenant's jobs."""

from __future__ import annotations

import grpc
import pytest

from mocap.v1 import gateway_pb2
from tests.gateway.helpers import Client, rpc_error

ALICE, BOB = "alice-token-123456", "bob-token-6543210"


@pytest.fixture
async def tenants_gateway(start_gateway, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  {ALICE}: alice\n  {BOB}: bob\n")
    return await start_gateway(tokens_file=str(tokens))


async def test_missing_or_unknown_token_is_unauthenticated(tenants_gateway, runner_bytes):
    address = f"127.0.0.1:{tenants_gateway.port}"
    for token in (None, "wrong-token-000000"):
        async with Client(address, token) as client:
            for call in (client.upload(runner_bytes), client.stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=client.metadata),
                         client.get("jobs/j-aaaaaaaaaaaaaaaaaaaa")):
                err = await rpc_error(call)
                assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.reason == "UNAUTHENTICATED"


async def test_another_tenants_job_is_not_found_on_every_rpc(tenants_gateway, runner_bytes):
    address = f"127.0.0.1:{tenants_gateway.port}"
    async with Client(address, ALICE) as alice, Client(address, BOB) as bob:
        job = await alice.upload(runner_bytes, request_id="shared-id")
        done = await alice.wait(job.name)
        artifact = done.artifacts[0].name
        upload = await alice.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="shared-id"), metadata=alice.metadata)
        md = bob.metadata
        calls = {
            "GetJob": bob.get(job.name),
            "CancelJob": bob.stub.CancelJob(gateway_pb2.CancelJobRequest(name=job.name), metadata=md),
            "DeleteJob": bob.stub.DeleteJob(gateway_pb2.DeleteJobRequest(name=job.name), metadata=md),
            "WatchJob": bob.events(job.name),
            "DownloadArtifact": bob.download(artifact),
            "GetUpload": bob.stub.GetUpload(gateway_pb2.GetUploadRequest(request_id="shared-id"), metadata=md),
            "GetUpload by name": bob.stub.GetUpload(gateway_pb2.GetUploadRequest(name=upload.name), metadata=md),
        }
        for rpc, call in calls.items():
            err = await rpc_error(call)
            assert err.code == grpc.StatusCode.NOT_FOUND, rpc
        assert not (await bob.stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=md)).jobs
        # Bob's uploads are his own: the same request_id and the same bytes make a new job for him.
        bobs = await bob.upload(runner_bytes, request_id="shared-id")
        assert bobs.name != job.name
        assert [j.name for j in (await alice.stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=alice.metadata)).jobs] == [job.name]
        assert (await alice.get(job.name)).name == job.name  # nothing Bob did touched it


async def test_open_single_user_mode_accepts_any_caller(gateway, runner_bytes):
    address = f"127.0.0.1:{gateway.port}"
    async with Client(address) as anonymous, Client(address, "whatever-token") as with_token:
        job = await anonymous.upload(runner_bytes)
        assert (await with_token.get(job.name)).name == job.name  # one tenant, "default"


def test_malformed_tokens_file_stops_startup(tmp_path):
    from gateway.tenancy import Tenancy

    bad = tmp_path / "tokens.yaml"
    for text in ("tokens: []\n", "nothing: here\n", "tokens:\n  short: alice\n", "tokens:\n  long-enough-token: 'bad tenant!'\n"):
        bad.write_text(text)
        with pytest.raises(SystemExit):
            Tenancy.from_file(str(bad))
    with pytest.raises(SystemExit):
        Tenancy.from_file(str(tmp_path / "missing.yaml"))
