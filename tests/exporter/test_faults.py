"""A Blender child that hangs is killed with its whole process group at the timeout, and so is one
whose Export call is cancelled: no process left (child and grandchild), the call's temporary
directory gone, a clear error.

The hang is the documented test-only knob of `exporter_svc.blender_child`:
MOCAP_EXPORTER_TEST_HANG_BLENDER=1 makes the child, after importing bpy, start a grandchild that
ignores SIGTERM and then sleep forever — so only a SIGKILL of the whole group ends it.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import psutil
import pytest

from exporter_svc.blender_child import HANG_ENV
from mocap.v1 import common_pb2, exporter_pb2_grpc
from mocap_common.rpc_errors import describe_rpc_error
from tests.exporter.conftest import cmu_track, video_info
from tests.exporter.test_service import export, header, requests, work_dir_entries

TIMEOUT_S = 4.0


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _gone(process: psutil.Process) -> bool:
    """Exited (a zombie waiting for an unrelated reaper, e.g. a container's PID 1, counts as gone)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_for_blender(service_pid: int, deadline_s: float = 60.0) -> list[psutil.Process]:
    """The hanging Blender child and its grandchild, once both exist."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        procs = [p for p in _descendants(service_pid) if not _gone(p)]
        if len(procs) >= 2:
            return procs
        await asyncio.sleep(0.1)
    raise AssertionError("the Blender child and its grandchild never appeared")


def _request():
    track = cmu_track("cmu_131_01", frames=30)
    return requests(header(video_info(30), formats=[common_pb2.OUTPUT_FORMAT_FBX]), [track])


async def test_hanging_blender_is_killed_with_its_group_at_the_timeout(exporter_factory):
    service = exporter_factory("--blender-timeout-s", str(TIMEOUT_S), env={HANG_ENV: "1"})
    call = asyncio.ensure_future(export(service.address, _request()))
    procs = await _wait_for_blender(service.pid)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    elapsed = time.monotonic() - started
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details.reason == "BLENDER_TIMEOUT"
    assert "did not finish within 4 s" in details.message
    # Killed at the timeout (plus the 2 s SIGTERM grace the grandchild ignores): generous bound.
    assert elapsed < TIMEOUT_S + 15
    # SIGKILL is delivered before the call fails; on a loaded machine the kernel may take a moment
    # to finish the processes off.
    settle = time.monotonic() + 3.0
    while not all(_gone(p) for p in procs) and time.monotonic() < settle:
        await asyncio.sleep(0.02)
    assert all(_gone(p) for p in procs), [(p.pid, p.status(), p.cmdline()) for p in procs if not _gone(p)]
    assert [p for p in _descendants(service.pid) if not _gone(p)] == []
    assert work_dir_entries(service) == []
    assert "killing its process group" in service.log_text()


async def test_cancelled_export_kills_blender_and_cleans_up_within_seconds(exporter_factory):
    service = exporter_factory("--blender-timeout-s", "300", env={HANG_ENV: "1"})
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = exporter_pb2_grpc.ExporterServiceStub(channel)
        call = stub.Export(_request(), timeout=120)
        steps = []
        async for response in call:  # read progress until Blender is running
            steps.append(response.progress.step)
            if response.progress.step == "blender":
                break
        procs = await _wait_for_blender(service.pid)
        call.cancel()
        cancelled_at = time.monotonic()
        while time.monotonic() - cancelled_at < 10 and not (all(_gone(p) for p in procs) and not work_dir_entries(service)):
            await asyncio.sleep(0.05)
        cleanup_s = time.monotonic() - cancelled_at
    assert all(_gone(p) for p in procs), [(p.pid, p.status()) for p in procs if not _gone(p)]
    assert work_dir_entries(service) == []
    assert cleanup_s < 10, cleanup_s  # "within seconds": the group gets SIGTERM, SIGKILL after 2 s
    assert "solve" in steps
    # The service is unharmed: the next call (without the hang it could not finish; BVH only) works.
    got = await export(service.address, requests(header(video_info(30), formats=[common_pb2.OUTPUT_FORMAT_BVH]),
                                                 [cmu_track("cmu_131_01", frames=30)]))
    assert "take-person-1.bvh" in got.files


async def test_failing_blender_child_is_reported_as_blender_failed(exporter_factory):
    # A child that exits with an error at once (here: an interpreter that is not Python at all).
    service = exporter_factory("--blender-python", "/bin/false")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(service.address, _request())
    details = describe_rpc_error(caught.value)
    assert details.code == grpc.StatusCode.INTERNAL and details.reason == "BLENDER_FAILED"
    assert details.message == "Blender export failed: exit status 1"
    assert work_dir_entries(service) == []
