"""A Blender child that hangs is killed with its whole process group at the timeout, and so is one
whose Export call is cancelled: no process left (child and grandchild), the call's temporary
directory gone, a clear error.

The hang is the documented test-only knob of `exporter_svc.blender_child`:
MOCAP_EXPORTER_TEST_HANG_BLENDER=1 makes the child, after importing bpy, start a grandchild that
ignores SIGTERM and then sleep forever — so only a SIGKILL of the whole group ends it.

A crash of the exporter itself (SIGKILL) takes that group with it, and the restarted exporter's
startup sweep kills whatever it finds still recorded in a leftover call directory before deleting
it — but nothing that is not its own. And a cancelled export leaves nothing at error level in the
log (a stopped worker thread's `Cancelled` is read, not reported as never retrieved).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import sys
import time

import grpc
import psutil
import pytest

from exporter_svc.blender_child import HANG_ENV
from mocap.v1 import common_pb2, exporter_pb2_grpc
from mocap_common.procs import MARK_ENV, RECORD_NAME
from mocap_common.rpc_errors import describe_rpc_error
from tests.exporter.conftest import cmu_track, video_info
from tests.exporter.test_service import export, header, requests, work_dir_entries
from tests.support import ServiceProcess

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


def _is_watcher(process: psutil.Process) -> bool:
    """The shim that guards a child for its owner (`mocap_common.procs`), not part of Blender."""
    try:
        return any(arg.endswith("child_shim.py") for arg in process.cmdline())
    except psutil.Error:
        return False


async def _wait_for_blender(service_pid: int, deadline_s: float = 60.0) -> list[psutil.Process]:
    """The hanging Blender child and its grandchild, once both exist."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        procs = [p for p in _descendants(service_pid) if not _gone(p) and not _is_watcher(p)]
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


def _mark_of(process: psutil.Process) -> str:
    return process.environ().get(MARK_ENV, "")


def _live_with_mark(mark: str) -> list[psutil.Process]:
    """Every live process (this user's) whose environment carries the child mark `mark`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK_ENV) == mark and not _gone(process):
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


async def _settled(processes: list[psutil.Process], within_s: float) -> float:
    """Waits until every process is gone; how long that took (≥ within_s if some are not)."""
    started = time.monotonic()
    while not all(_gone(p) for p in processes) and time.monotonic() - started < within_s:
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def reap_at_end():
    """Processes a test expects to be gone, killed at its end whatever it found: a regression
    must not leave hanging Blenders behind on a shared machine."""
    watched: list[psutil.Process] = []
    yield watched
    for process in watched:
        with contextlib.suppress(psutil.Error):
            process.kill()


async def _hanging_blender(exporter_factory, reap_at_end: list[psutil.Process],
                           ) -> tuple[ServiceProcess, asyncio.Future, list[psutil.Process], str]:
    """An exporter whose Export call is stuck in a hanging Blender (300 s timeout): the service,
    the call, the Blender child and grandchild, and their mark."""
    service = exporter_factory("--blender-timeout-s", "300", env={HANG_ENV: "1"})
    call = asyncio.ensure_future(export(service.address, _request()))
    procs = await _wait_for_blender(service.pid)
    reap_at_end.extend(procs)
    return service, call, procs, _mark_of(procs[0])


async def test_blender_dies_with_a_killed_exporter_and_a_restart_leaves_nothing(exporter_factory, reap_at_end):
    service, call, procs, mark = await _hanging_blender(exporter_factory, reap_at_end)
    service.kill()
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    took = await _settled(procs, 5.0)
    assert all(_gone(p) for p in procs), [(p.pid, p.cmdline()) for p in procs if not _gone(p)]
    assert took < 2.0, took  # the kernel and the watcher act at once; 2 s allows for a loaded machine
    assert _live_with_mark(mark) == []
    assert len(work_dir_entries(service)) == 1  # the crash left its call directory behind
    restarted = exporter_factory("--blender-timeout-s", "300")
    assert work_dir_entries(restarted) == []  # swept before SERVING
    assert _live_with_mark(mark) == []


async def test_restarted_exporter_kills_what_a_crash_left_running_and_nothing_else(exporter_factory, reap_at_end):
    service, call, procs, mark = await _hanging_blender(exporter_factory, reap_at_end)
    # The worst case: the child's watcher is gone too (say the OOM killer took it), so when the
    # exporter dies only the Blender child is killed (PR_SET_PDEATHSIG) and the grandchild lives on.
    for watcher in [p for p in _descendants(service.pid) if _is_watcher(p)]:
        watcher.kill()
    service.kill()
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    child_died_alone = await _settled(procs[:1], 3.0) < 3.0  # PR_SET_PDEATHSIG, no watcher needed
    leftovers = [p for p in procs if not _gone(p)]
    assert leftovers, "nothing survived the crash: the sweep would have nothing to do"
    # A stranger whose group id a stale record names (ids are reused) must survive the sweep.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        stale = service.work_dir / "export-stale" / "blender"
        stale.mkdir(parents=True)
        (stale / RECORD_NAME).write_text(json.dumps({"mark": secrets.token_hex(16), "pgid": stranger.pid}))
        restarted = exporter_factory("--blender-timeout-s", "300")
        assert all(_gone(p) for p in leftovers), [(p.pid, p.cmdline()) for p in leftovers if not _gone(p)]
        assert _live_with_mark(mark) == []
        assert work_dir_entries(restarted) == []
        assert stranger.poll() is None, "the sweep killed a process that was not the exporter's"
        assert "killed leftover child processes" in restarted.log_text()
        assert child_died_alone, "the Blender child outlived the exporter"
    finally:
        stranger.kill()
        stranger.wait()


async def test_cancelled_export_leaves_no_error_in_the_log(exporter_factory):
    service = exporter_factory()
    # Twelve long takes: solving them takes seconds, so the cancel lands while the worker thread
    # is mid-solve and must be stopped (it ends with Cancelled at the next track).
    tracks = [cmu_track("cmu_131_01", track_id=i, step=1, fps=120.0) for i in range(1, 13)]
    head = header(video_info(len(tracks[0].frame_index), fps=120.0), formats=[common_pb2.OUTPUT_FORMAT_BVH])
    async with grpc.aio.insecure_channel(service.address) as channel:
        call = exporter_pb2_grpc.ExporterServiceStub(channel).Export(requests(head, tracks), timeout=120)
        async for response in call:
            if response.progress.step == "solve":
                break
        call.cancel()
    deadline = time.monotonic() + 20
    while work_dir_entries(service) and time.monotonic() < deadline:  # the call has unwound
        await asyncio.sleep(0.05)
    assert work_dir_entries(service) == []
    # Another call (allocations: the abandoned future gets collected) works, then a clean stop.
    got = await export(service.address, requests(header(video_info(30), formats=[common_pb2.OUTPUT_FORMAT_BVH]),
                                                 [cmu_track("cmu_131_01", frames=30)]))
    assert "take-person-1.bvh" in got.files
    assert service.stop() == 0
    log = service.log_text()
    assert "Future exception was never retrieved" not in log
    assert [line for line in log.splitlines() if "[error" in line] == []
    assert "worker stopped: its call was cancelled" in log  # the cancel did reach a running worker
