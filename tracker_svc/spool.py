"""Per-call spool directories under the tracker's `spool_dir`, and the startup sweep of leftovers.

A Track call whose container needs seeking (an MP4 without faststart) spools the whole upload to
disk (tracker_svc.video). The call removes it on every exit path, but a killed tracker cannot, and
the user's video would stay on disk forever. So:

- each call gets `<spool_dir>/mocap-spool-<random>/` with a `lock` file that the call holds
  flock'ed (exclusive) for its whole lifetime; the decoder spools inside that directory;
- at startup, before SERVING, the tracker removes every `mocap-spool-*` directory whose lock it
  can take without waiting: the kernel drops a flock when its process dies, so a free lock means
  a dead owner. A held lock means a live tracker shares the spool dir (a misconfiguration, but not
  one to delete a running call's upload over): that directory is kept. One without a lock file
  was spooled into directly by an older version and is removed as well.

A call's directory is built under a staging name (`.mocap-staging-*`, never swept) and renamed to
`mocap-spool-*` only once its lock is held, so a sweep never finds a live call's directory with a
free or missing lock. A tracker killed inside that window leaves an empty staging directory: no data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mocap_common.logs import get_logger

log = get_logger(__name__)

PREFIX = "mocap-spool-"
STAGING_PREFIX = ".mocap-staging-"
LOCK_NAME = "lock"


@contextlib.contextmanager
def call_spool_dir(root: Path) -> Iterator[Path]:
    """A fresh directory under `root`, locked for the call and removed on every exit path."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    path = staging
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # uncontended: no sweep looks at staging names
        path = root / (PREFIX + staging.name.removeprefix(STAGING_PREFIX))
        os.rename(staging, path)  # the lock follows the inode: visible to sweeps only when held
        yield path
    finally:
        # Removed before the lock is dropped, so no sweep can take a half-removed directory.
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def sweep_spool(root: Path) -> list[Path]:
    """Removes the call directories left by dead trackers under `root`; returns them."""
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith(PREFIX) or entry.is_symlink() or not entry.is_dir():
            continue
        if _remove_if_orphaned(entry):
            removed.append(entry)
    return removed


def _remove_if_orphaned(path: Path) -> bool:
    """Removes `path` unless a live process holds its lock (checked without waiting)."""
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        fd = None  # an older version's spool directory (or one its owner is removing right now)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("kept a spool directory in use by a live process", path=str(path))
                return False
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)  # while holding its lock
        log.warning("removed a spool directory left by a tracker that died", path=str(path), bytes=size)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (for the log: how much a dead call had left)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total
