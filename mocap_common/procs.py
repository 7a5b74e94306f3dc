"""Child processes that cannot outlive their owner (reliability rule 1).

Every child runs in its own session (so its process group holds it and all its descendants);
on timeout, cancellation or any exit of the owner the whole group is sent SIGTERM, then SIGKILL
after a short grace, and reaped. Used by the exporter (Blender), `lease run` and `make run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path

from mocap_common.logs import get_logger

log = get_logger(__name__)


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
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Starts `argv` in its own process group; on exit of the block the group is ended and reaped."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env) if env is not None else None,
        cwd=str(cwd) if cwd is not None else None,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        await finish_uncancellable(terminate_group(proc, grace_s))


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
