"""Per-call temporary directories under the exporter's work directory.

Every Export call gets its own directory `<work_dir>/export-<random>` (mode 0700) for the spooled
video, the Blender job spec and every produced file; it is removed when the call ends, whatever
the ending (success, error, cancellation). A crash can still leave one behind, so the service
sweeps `export-*` directories at startup: the work directory belongs to this service alone.

A crashed exporter's Blender child normally dies with it (`mocap_common.procs`), but the sweep
does not count on that: a directory may still be in use by a leftover process, which would then
write into a deleted directory, run past its timeout and hold its memory. So the sweep first
kills every process recorded in the directory (`procs.RECORD_NAME` files, written when a child
starts; only processes that carry the recorded mark are touched), waits for them, then deletes.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from mocap_common.logs import get_logger
from mocap_common.procs import RECORD_NAME, kill_recorded

log = get_logger(__name__)

PREFIX = "export-"


@contextlib.asynccontextmanager
async def call_workspace(root: Path) -> AsyncIterator[Path]:
    """A fresh private directory under `root`, removed on every exit path."""
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
    try:
        yield path
    finally:
        # Synchronous on purpose: a cancellation cannot interrupt it half-way.
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            log.error("could not remove call workspace", path=str(path))


def sweep_orphans(root: Path) -> int:
    """Removes call directories left by a previous run, after killing any process still using
    them; returns how many directories."""
    if not root.is_dir():
        return 0
    removed = killed = 0
    for entry in root.iterdir():
        if entry.name.startswith(PREFIX) and entry.is_dir() and not entry.is_symlink():
            killed += _kill_leftovers(entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.warning("removed orphaned call workspaces", count=removed, killed_processes=killed, root=str(root))
    return removed


def _kill_leftovers(call_dir: Path) -> int:
    """Kills (and waits for) the processes recorded anywhere in one call directory."""
    # rglob does not follow symlinked directories, so the search stays inside the directory.
    return sum(kill_recorded(record) for record in call_dir.rglob(RECORD_NAME)
               if record.is_file() and not record.is_symlink())
