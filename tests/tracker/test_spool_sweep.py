"""The tracker's spool after a crash, with the tracker and the lease broker as real child processes.

An MP4 without faststart is spooled to disk whole before decoding; a tracker killed meanwhile used
to leave that copy of the user's video under its spool_dir forever. A restarted tracker removes
it before SERVING, but never a directory that a live tracker sharing the spool dir is using.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from mocap.v1 import tracker_pb2, tracker_pb2_grpc
from tests.support import RUNNER_MP4, ServiceProcess
from tracker_svc.video import needs_seeking

CHUNK = 256 * 1024
SENT_BEFORE_PAUSE = 3  # chunks; the upload then stalls, so the spool file stays on disk


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broker")
    with ServiceProcess("resource_svc", ["--db-path", str(tmp / "leases.sqlite3")], log_path=tmp / "resource.log") as proc:
        yield proc


def _tracker(spool: Path, broker: ServiceProcess, log_path: Path) -> ServiceProcess:
    return ServiceProcess("tracker_svc", ["--spool-dir", str(spool)], env={"MOCAP_RESOURCE_ADDR": broker.address},
                          log_path=log_path, ready_timeout_s=120).start()


async def _stalled_upload(data: bytes) -> AsyncIterator[tracker_pb2.TrackRequest]:
    yield tracker_pb2.TrackRequest(header=tracker_pb2.TrackHeader(job="jobs/spool", size_bytes=len(data)))
    for i, start in enumerate(range(0, len(data), CHUNK)):
        if i == SENT_BEFORE_PAUSE:
            await asyncio.sleep(3600)  # until the test cancels the call
        yield tracker_pb2.TrackRequest(chunk=data[start:start + CHUNK])


@contextlib.asynccontextmanager
async def _stalled_call(tracker: ServiceProcess, data: bytes) -> AsyncIterator[None]:
    """A Track call that sends a few chunks and then waits; cancelled when the block ends."""
    async with grpc.aio.insecure_channel(tracker.address) as channel:
        call = tracker_pb2_grpc.TrackerServiceStub(channel).Track(_stalled_upload(data), timeout=300)
        reader = asyncio.create_task(_drain(call))
        try:
            yield
        finally:
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    async for _ in call:
        pass


def _spool_files(spool: Path) -> dict[Path, int]:
    """Spooled inputs by their top-level directory under `spool` (whatever the nesting below it)."""
    return {spool / path.relative_to(spool).parts[0]: path.stat().st_size for path in spool.glob("mocap-spool-*/**/input")}


async def _wait_for_spool_file(spool: Path, known: set[Path], timeout_s: float = 60.0) -> Path:
    """The top-level directory of a new spool file holding every chunk sent before the pause."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for directory, size in _spool_files(spool).items():
            if directory not in known and size >= SENT_BEFORE_PAUSE * CHUNK:
                return directory
        await asyncio.sleep(0.05)
    raise AssertionError(f"no spool file under {spool} after {timeout_s}s: {_spool_files(spool)}")


async def _wait_until_empty(spool: Path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while list(spool.iterdir()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert list(spool.iterdir()) == []


async def test_restarted_tracker_removes_a_killed_calls_spool_but_not_a_live_ones(tmp_path, broker):
    data = RUNNER_MP4.read_bytes()
    assert needs_seeking(data[:64 * 1024])  # the demo clip has its index at the end: it is spooled
    spool = tmp_path / "spool"
    trackers: list[ServiceProcess] = []
    try:
        # 1. A tracker is killed (SIGKILL, no cleanup) while it spools a call's upload.
        killed = _tracker(spool, broker, tmp_path / "killed.log")
        trackers.append(killed)
        async with _stalled_call(killed, data):
            leftover = await _wait_for_spool_file(spool, set())
            killed.kill()
        assert leftover in _spool_files(spool)  # the user's video is still on disk

        # 2. A tracker started on the same spool dir has removed it by the time it is SERVING.
        restarted = _tracker(spool, broker, tmp_path / "restarted.log")
        trackers.append(restarted)
        assert not leftover.exists(), f"{leftover} survived the restart"
        assert leftover.name in restarted.log_text()  # the removal is logged

        # 3. A second tracker on the same (misconfigured, shared) spool dir leaves a live call's spool alone.
        async with _stalled_call(restarted, data):
            live = await _wait_for_spool_file(spool, set())
            trackers.append(_tracker(spool, broker, tmp_path / "sharing.log"))
            assert live in _spool_files(spool), "a live call's spool was removed by another tracker's sweep"
        await _wait_until_empty(spool)  # the cancelled call removed its own
    finally:
        for tracker in trackers:
            tracker.stop()
