"""Per-call temporary directories under the exporter's work directory.

Every Export call gets its own directory `<work_dir>/export-<random>` (mode 0700) for the spooled
video, the Blender job spec and every produced file; it is removed when the call ends, whatever
the ending (success, error, cancellation). A crash can still leave one behind, so the service
sweeps `export-*` directories at startup: the work directory belongs to this service alone.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from mocap_common.logs import get_logger

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
    """Removes call directories left by a previous run; returns how many."""
    if not root.is_dir():
        return 0
    removed = 0
    for entry in root.iterdir():
        if entry.name.startswith(PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.warning("removed orphaned call workspaces", count=removed, root=str(root))
    return removed
