"""Children started through `mocap_common.procs.child_process` cannot outlive their owner: an
owner killed with SIGKILL takes the child and the child's own children with it (PR_SET_PDEATHSIG
plus the liveness-pipe watcher), while a child still looks exactly as if started directly (its
pid leads its group, its exit status is its own, its stdout reaches EOF), the watcher is reaped
with the child (no zombie left under a PID 1 that never reaps), and `kill_recorded`
finishes off what a crashed owner recorded — touching only processes that carry the mark.

Real processes throughout: the owner is a separate Python process, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mocap_common import child_shim
from mocap_common.procs import MARK_ENV, SHIM, child_process, kill_recorded, marked_processes
from tests.support import REPO

# Ignores SIGTERM and sleeps: only a SIGKILL ends it (a stand-in for a hung grandchild).
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

# The owner: starts a child that starts a stubborn grandchild, runs (and ends) a worker thread —
# the child must not mind that thread's exit, PR_SET_PDEATHSIG is tied to the loop's thread —
# then writes "CHILD GRANDCHILD" to argv[1] and waits. argv[2] is the grandchild's code.
OWNER = textwrap.dedent("""
    import asyncio, os, shlex, sys, time
    from mocap_common.procs import child_process

    async def main() -> None:
        pids_file, grandchild = sys.argv[1], sys.argv[2]
        script = f"{shlex.quote(sys.executable)} -c {shlex.quote(grandchild)} & echo $$ $! > {pids_file}.tmp; wait"
        async with child_process(["sh", "-c", script], stdin=None) as proc:
            await asyncio.to_thread(time.sleep, 0.2)
            while not os.path.exists(pids_file + ".tmp"):
                await asyncio.sleep(0.02)
            os.replace(pids_file + ".tmp", pids_file)
            await proc.wait()

    asyncio.run(main())
""")


def _gone(pid: int) -> bool:
    """Exited; a zombie waiting for an unrelated reaper (a container's PID 1) counts as gone."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout_s: float) -> float:
    started = time.monotonic()
    while not all(_gone(pid) for pid in pids) and time.monotonic() - started < timeout_s:
        time.sleep(0.02)
    return time.monotonic() - started


def _wait_file(path: Path, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def _kill_groups(pids: list[int]) -> None:
    """Test cleanup: whatever a failure left running."""
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_child_and_grandchild_die_with_an_owner_killed_with_sigkill(tmp_path):
    pids_file = tmp_path / "pids"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(pids_file), STUBBORN], cwd=REPO,
                             start_new_session=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in _wait_file(pids_file).split()]
        assert not any(_gone(pid) for pid in pids)  # alive after the owner's worker thread ended
        owner.kill()
        owner.wait(10)
        took = _wait_gone(pids, 5.0)
        assert all(_gone(pid) for pid in pids), [psutil.Process(p).cmdline() for p in pids if not _gone(p)]
        assert took < 2.0, took
    finally:
        owner.kill()
        owner.wait(10)
        _kill_groups(pids)


async def test_a_child_keeps_its_pid_group_status_and_stdout():
    report = "import os; print(os.getpid(), os.getpgrp(), flush=True); raise SystemExit(7)"
    async with child_process([sys.executable, "-c", report], stdout=subprocess.PIPE) as proc:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)  # EOF: the watcher holds no stdout
    pid, pgid = (int(v) for v in out.split())
    assert pid == proc.pid == pgid  # the shim became the command, which leads its own group
    assert proc.returncode == 7
    async with child_process(["sh", "-c", "kill -TERM $$"]) as proc:
        assert await proc.wait() == -signal.SIGTERM  # a death by signal reads as before


async def test_the_block_leaves_no_process_of_the_child_behind():
    async with child_process(["sh", "-c", f"{sys.executable} -c '{STUBBORN}' & wait"], grace_s=0.5) as proc:
        mark = psutil.Process(proc.pid).environ()[MARK_ENV]
        await _until(lambda: _kinds(mark) == {"command", "grandchild"})
        assert len(_watchers()) == 1
    await _until(lambda: marked_processes(mark) == [], timeout_s=3.0)  # SIGKILL takes a moment
    assert _watchers() == []  # killed and reaped by the owner: not even a zombie left


def _kinds(mark: str) -> set[str]:
    """Which of the child's processes are up: "command" (sh, once exec()ed), "grandchild"."""
    found = set()
    for pid, _ in marked_processes(mark):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        found.add("command" if argv[0] == "sh" else "grandchild" if "SIG_IGN" in argv[-2] else "other")
    return found


def _watchers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "watch" in p.cmdline() and str(SHIM) in p.cmdline()]


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_command_that_cannot_run_raises_as_exec_would(tmp_path):
    with pytest.raises(FileNotFoundError):
        async with child_process(["/no/such/command"]):
            pass
    with pytest.raises(FileNotFoundError):
        async with child_process(["no-such-command-anywhere"]):
            pass
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        async with child_process([str(script)]):
            pass


def test_a_command_whose_owner_is_already_gone_never_starts(tmp_path):
    marker = tmp_path / "ran"
    alive_read, alive_write = os.pipe()
    os.close(alive_write)  # the owner's end is closed: the owner is gone
    try:
        code = subprocess.run([sys.executable, "-I", "-S", str(SHIM), "exec", str(alive_read), "touch", str(marker)],
                              pass_fds=(alive_read,), timeout=30).returncode
    finally:
        os.close(alive_read)
    assert code == child_shim.EXIT_OWNER_GONE
    assert not marker.exists()


def test_kill_recorded_kills_only_what_carries_the_recorded_mark(tmp_path):
    mark = secrets.token_hex(16)
    leftover = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{STUBBORN}' & wait"],
                                env={**os.environ, MARK_ENV: mark}, start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(marked_processes(mark)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        pids = [pid for pid, _ in marked_processes(mark)]
        assert len(pids) == 2
        record = tmp_path / "child-process.json"
        record.write_text(json.dumps({"mark": mark, "pgid": leftover.pid}))
        stale = tmp_path / "stale.json"  # a stale record naming a group id now someone else's
        stale.write_text(json.dumps({"mark": secrets.token_hex(16), "pgid": stranger.pid}))
        assert kill_recorded(stale) == 0
        assert kill_recorded(record) == 2
        assert all(_gone(pid) for pid in pids)
        assert stranger.poll() is None
    finally:
        for proc in (leftover, stranger):
            _kill_groups([proc.pid])
            proc.wait(10)
