"""The `mocap` command as users run it (a subprocess), against a real gateway and fake stages."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc

from gateway import cli, client
from mocap.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.helpers import Client
from tests.support import REPO, RUNNER_MP4, free_port


async def mocap(*args: str, addr: str | None = None, token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MOCAP_TOKEN", None)
    if addr:
        env["MOCAP_GATEWAY_ADDR"] = addr
    if token:
        env["MOCAP_TOKEN"] = token
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=timeout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_submit_wait_downloads_every_artifact(gateway, tmp_path):
    addr = f"127.0.0.1:{gateway.port}"
    out = tmp_path / "out"
    run = await mocap("submit", str(RUNNER_MP4), "--formats", "bvh,glb", "--wait", "--out", str(out), "-q", addr=addr)
    assert run.returncode == cli.EXIT_OK, run.stderr
    lines = run.stdout.split()
    name = lines[0]
    assert name.startswith("jobs/j-")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["runner_1080p-person-1.bvh", "runner_1080p-person-1.glb", "runner_1080p-preview.mp4",
                     "runner_1080p-quality.json", "runner_1080p-tracks.pb"]
    got = json.loads((await mocap("get", name, "--json", addr=addr)).stdout)
    assert got["state"] == "JOB_STATE_SUCCEEDED" and got["sha256"] == sha256(RUNNER_MP4)
    for artifact in got["artifacts"]:
        assert sha256(out / artifact["filename"]) == artifact["sha256"]
    listed = json.loads((await mocap("list", "--json", addr=addr)).stdout)
    assert [j["name"] for j in listed["jobs"]] == [name]
    assert json.loads((await mocap("list", "--state", "failed", "--json", addr=addr)).stdout).get("jobs", []) == []
    human = await mocap("get", name.removeprefix("jobs/"), addr=addr)  # a bare job id works too
    assert human.returncode == 0 and "1920x1088, 180 frames" in human.stdout


async def test_download_one_format_resumes_and_verifies(gateway, tmp_path):
    addr = f"127.0.0.1:{gateway.port}"
    async with Client(addr) as client:
        job = await client.wait((await client.upload(RUNNER_MP4.read_bytes())).name)
    bvh = next(a for a in job.artifacts if a.kind == common_pb2.ARTIFACT_KIND_BVH)
    whole = (await Client(addr).download(bvh.name))[1]
    target = tmp_path / "take.bvh"
    Path(f"{target}.part").write_bytes(whole[:100])  # an interrupted earlier download
    run = await mocap("download", job.name, "--format", "bvh", "--out", str(target), addr=addr)
    assert run.returncode == 0, run.stderr
    assert target.read_bytes() == whole and not Path(f"{target}.part").exists()

    Path(f"{target}.part").write_bytes(b"garbage!" * 10)  # a corrupt leftover is caught, not kept
    target.unlink()
    bad = await mocap("download", job.name, "--format", "bvh", "--out", str(target), addr=addr)
    assert bad.returncode == cli.EXIT_INTERNAL and "SHA-256" in bad.stderr
    assert not target.exists() and not Path(f"{target}.part").exists()


async def test_exit_codes(start_gateway, stages, tmp_path):
    gateway = await start_gateway()
    addr = f"127.0.0.1:{gateway.port}"
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 100)

    stages.tracker.knobs.mode = "fail"
    failed = await mocap("submit", str(RUNNER_MP4), "--wait", "-q", "--out", str(tmp_path), addr=addr)
    assert failed.returncode == cli.EXIT_JOB_FAILED and "STAGE_FAILED" in failed.stderr

    invalid = await mocap("submit", str(text), addr=addr)
    assert invalid.returncode == cli.EXIT_USAGE and "NOT_A_VIDEO" in invalid.stderr
    assert (await mocap("submit", str(tmp_path / "missing.mp4"), addr=addr)).returncode == cli.EXIT_NOT_FOUND
    assert (await mocap("submit", str(RUNNER_MP4), "--formats", "obj", addr=addr)).returncode == cli.EXIT_USAGE
    assert (await mocap("frobnicate", addr=addr)).returncode == cli.EXIT_USAGE
    missing = await mocap("get", "jobs/j-aaaaaaaaaaaaaaaaaaaa", addr=addr)
    assert missing.returncode == cli.EXIT_NOT_FOUND and "NOT_FOUND" in missing.stderr
    down = await mocap("list", addr=f"127.0.0.1:{free_port()}")
    assert down.returncode == cli.EXIT_UNAVAILABLE and "cannot reach the gateway" in down.stderr

    stages.tracker.knobs.mode = "hang"
    async with Client(addr) as client:
        job = await client.upload(RUNNER_MP4.read_bytes(), options=common_pb2.JobOptions(max_persons=2))
        await client.wait(job.name, {common_pb2.JOB_STATE_RUNNING})
        not_yet = await mocap("download", job.name, "--all", "--out", str(tmp_path / "x"), addr=addr)
        assert not_yet.returncode == cli.EXIT_USAGE
        busy = await mocap("delete", job.name, addr=addr)
        assert busy.returncode == cli.EXIT_USAGE and "JOB_STATE" in busy.stderr
        watcher = asyncio.ensure_future(mocap("watch", job.name, "-q", addr=addr))
        await asyncio.sleep(1.0)
        assert (await mocap("cancel", job.name, addr=addr)).returncode == cli.EXIT_OK
        watched = await watcher
    assert watched.returncode == cli.EXIT_CANCELLED, watched.stderr
    assert (await mocap("delete", job.name, addr=addr)).returncode == cli.EXIT_OK


async def test_authentication_exit_code(start_gateway, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("tokens:\n  alice-token-123456: alice\n")
    gateway = await start_gateway(tokens_file=str(tokens))
    addr = f"127.0.0.1:{gateway.port}"
    assert (await mocap("list", addr=addr)).returncode == cli.EXIT_AUTH
    assert (await mocap("list", addr=addr, token="alice-token-123456")).returncode == cli.EXIT_OK
    assert (await mocap("list", "--token", "alice-token-123456", addr=addr)).returncode == cli.EXIT_OK


class _BreakFirstUpload(grpc.StreamUnaryClientInterceptor):
    """Breaks the first CreateJob stream after a few chunks, as a dropped connection would."""

    def __init__(self, after_chunks: int) -> None:
        self.after_chunks = after_chunks
        self.headers: list[gateway_pb2.UploadHeader] = []

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        first_call = not self.headers

        def requests():
            for i, request in enumerate(request_iterator):
                if request.HasField("header"):
                    self.headers.append(request.header)
                if first_call and i > self.after_chunks:
                    import time
                    time.sleep(0.3)  # let the chunks already sent arrive
                    raise ConnectionResetError("network dropped")
                yield request

        return continuation(client_call_details, requests())


async def test_submit_resumes_a_broken_upload_by_itself(gateway, tmp_path):
    data = RUNNER_MP4.read_bytes()
    breaker = _BreakFirstUpload(after_chunks=3)

    def upload() -> common_pb2.Job:
        conn = client.Connection(f"127.0.0.1:{gateway.port}", "")
        conn.stub = gateway_pb2_grpc.GatewayServiceStub(grpc.intercept_channel(conn.channel, breaker))
        try:
            return client.upload_video(conn, RUNNER_MP4, options=common_pb2.JobOptions(), request_id="cli-resume-1",
                                    sha256=hashlib.sha256(data).hexdigest(), chunk_bytes=256 * 1024)
        finally:
            conn.close()

    job = await asyncio.to_thread(upload)
    assert job.sha256 == hashlib.sha256(data).hexdigest() and job.size_bytes == len(data)
    assert len(breaker.headers) == 2 and breaker.headers[1].resume_offset == 3 * 256 * 1024
    assert breaker.headers[0].request_id == breaker.headers[1].request_id == "cli-resume-1"
