"""Child processes that cannot outlive their owner (reliability rule 1).

Every child runs in its own session (so its process group holds it and all its descendants);
on timeout, cancellation or any exit of the owner the whole group is sent SIGTERM, then SIGKILL
after a short grace, and reaped. Used by the exporter (Blender), `lease run` and `make run`.

That covers every ending the owner lives through. For those it does not (kill -9, the OOM
killer, a crash in native code) the child is tied to the owner from outside the owner, by
`child_shim.py` (see there):
- the child is started through the shim, which sets PR_SET_PDEATHSIG=SIGKILL (Linux) and then
  becomes the command by exec(): same pid, same group, same exit status as without it;
- a small watcher process, the owner's child, blocks on a liveness pipe whose only write end the
  owner holds; the kernel closes it when the owner dies, and the watcher then kills what is left
  of the child, descendants included, on any POSIX system. The owner closes its end only once
  the child's group and the watcher are gone.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits. asyncio forks in the event
loop's thread (`subprocess.Popen` runs synchronously inside `loop.subprocess_exec`); our
services, the launcher and `lease` run their loop in the main thread with `asyncio.run`, so that
thread lives exactly as long as the owner. A loop in another thread would take its children with
it when it ends, which is also right: nothing could await them any more.

Every child also carries a mark in its environment (`MARK_ENV`, a random token inherited by its
descendants). With `record=PATH` the mark and the group id are written to PATH, so that an owner
restarted after a crash can `kill_recorded` what its predecessor left, touching only processes
that carry the mark (a recorded pid or group id alone may belong to a stranger by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path

from mocap_common.child_shim import MARK_ENV, kill_marked, marked_processes
from mocap_common.logs import get_logger

log = get_logger(__name__)

SHIM = Path(__file__).resolve().with_name("child_shim.py")
# The shim runs on this interpreter, isolated and without site (-I -S): milliseconds.
SHIM_ARGV = (sys.executable, "-I", "-S", str(SHIM))
RECORD_NAME = "child-process.json"  # the conventional file name for `record=`
__all__ = ["MARK_ENV", "RECORD_NAME", "SHIM", "check_executable", "child_process", "finish_uncancellable",
           "group_alive", "kill_group", "kill_recorded", "marked_processes", "terminate_group", "wait_group_gone"]


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signals a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pgid reused by someone else's process: never touch it
        return False


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies included)."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


async def terminate_group(proc: asyncio.subprocess.Process, grace_s: float = 2.0) -> int | None:
    """SIGTERM the child's group, SIGKILL it after `grace_s`, and reap the child."""
    pgid = proc.pid  # start_new_session=True makes the child its group's leader
    if proc.returncode is None:
        kill_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            pass
    # Descendants may survive their leader: always finish the group off.
    kill_group(pgid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()
    return proc.returncode


@contextlib.asynccontextmanager
async def child_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    stdin: int | None = subprocess.DEVNULL,
    grace_s: float = 2.0,
    record: Path | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Starts `argv` in its own process group, tied to this process's life (see the module
    docstring); on exit of the block the group is ended and reaped. `record`: a file to write the
    child's mark and group id to, for `kill_recorded` after a crash of this process. Raises
    FileNotFoundError / PermissionError when `argv[0]` cannot be executed."""
    mark = secrets.token_hex(16)
    child_env = {**(os.environ if env is None else env), MARK_ENV: mark}
    check_executable(argv[0], child_env, cwd)
    if record is not None:  # before the start: a crash right after it must not go unrecorded
        _write_record(record, mark, None)
    alive_read, alive_write = os.pipe()  # both O_CLOEXEC: no other child inherits the write end
    try:
        proc = await _spawn([*SHIM_ARGV, "exec", str(alive_read), *argv], alive_read, env=child_env,
                            cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr)
    except BaseException:
        _close(alive_read, alive_write)
        raise
    watcher: asyncio.subprocess.Process | None = None
    try:
        watcher = await _start_watcher(alive_read, proc.pid, mark)
        if record is not None:
            _write_record(record, mark, proc.pid)
        yield proc
    finally:
        try:
            await finish_uncancellable(_end(proc, watcher, grace_s))
        finally:
            # Only now: with the write end closed while the child lives, the watcher would kill
            # it without its SIGTERM grace.
            _close(alive_read, alive_write)


async def _spawn(argv: Sequence[str], alive_read: int, *, env: Mapping[str, str], cwd: str | Path | None,
                 stdin: int | None, stdout: int | None, stderr: int | None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, env=dict(env), cwd=str(cwd) if cwd is not None else None, stdin=stdin, stdout=stdout,
        stderr=stderr, pass_fds=(alive_read,), start_new_session=True)


async def _start_watcher(alive_read: int, pgid: int, mark: str) -> asyncio.subprocess.Process:
    """The shim in its watch role: this process's own child (so it is reaped here, never left a
    zombie), in a session of its own, holding none of the child's files or directories."""
    # Without the mark: the watcher is not part of the child, nor of whatever child this process
    # itself may be (an ancestor's watcher must not kill it before it has done its work).
    env = {k: v for k, v in os.environ.items() if k != MARK_ENV}
    return await _spawn([*SHIM_ARGV, "watch", str(alive_read), str(pgid), mark], alive_read, env=env, cwd="/",
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _end(proc: asyncio.subprocess.Process, watcher: asyncio.subprocess.Process | None,
               grace_s: float) -> None:
    """The child's group first (the watcher still guards it meanwhile), then the watcher."""
    try:
        await terminate_group(proc, grace_s)
    finally:
        if watcher is not None:
            with contextlib.suppress(ProcessLookupError):
                watcher.kill()
            await watcher.wait()


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_executable(command: str, env: Mapping[str, str], cwd: str | Path | None) -> None:
    """Raises what exec would (FileNotFoundError, PermissionError): the shim is what gets
    exec()ed here, so without this check a missing command would only show as exit status 127."""
    if os.sep not in command:
        if shutil.which(command, path=env.get("PATH", os.defpath)) is None:
            raise FileNotFoundError(2, "command not found", command)
        return
    path = Path(cwd or ".") / command
    if not path.exists():
        raise FileNotFoundError(2, "no such file", command)
    if path.is_dir() or not os.access(path, os.X_OK):
        raise PermissionError(13, "not executable", command)


def _write_record(record: Path, mark: str, pgid: int | None) -> None:
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps({"mark": mark, "pgid": pgid, "owner_pid": os.getpid()}))
    os.replace(tmp, record)  # a crash mid-write leaves the old record or none, never half a one


def kill_recorded(record: Path, timeout_s: float = 5.0) -> int:
    """Kills whatever is left of a child recorded in `record` by an earlier run of its owner:
    every live process carrying its mark, with its process group; waits (up to `timeout_s`)
    until none is left. Returns how many processes it found. Linux only (it reads /proc);
    elsewhere the watcher is the only safeguard and this returns 0."""
    mark = _read_mark(record)
    if mark is None:
        return 0
    found = kill_marked(mark, timeout_s)
    if marked_processes(mark):
        log.error("could not kill a leftover child process", record=str(record), pids=sorted(found))
    elif found:
        log.warning("killed leftover child processes", record=str(record), pids=sorted(found))
    return len(found)


def _read_mark(record: Path) -> str | None:
    try:
        mark = json.loads(record.read_text()).get("mark")
    except (OSError, ValueError, AttributeError):
        return None
    return mark if isinstance(mark, str) and len(mark) >= 16 else None


async def finish_uncancellable(step: Awaitable[object]) -> None:
    """Runs a release step to completion even if the caller is cancelled meanwhile; the
    cancellation is re-raised afterwards."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Polls (for tests and CLIs) until no process of the group remains."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.05)
    return not group_alive(pgid)
