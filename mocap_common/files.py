"""Files that never escape their directory and never appear half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UnsafePath(ValueError):
    """A path would leave the directory it must stay in."""


def inside(root: Path, *parts: str) -> Path:
    """`root / parts`, refusing anything that resolves outside `root` (.., absolute, links)."""
    root_resolved = root.resolve()
    for part in parts:
        if not part or "\x00" in part or part.startswith("/") or part in (".", ".."):
            raise UnsafePath(f"unsafe path component {part!r}")
    candidate = root_resolved.joinpath(*parts).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise UnsafePath(f"{candidate} is outside {root_resolved}")
    return candidate


def fsync_dir(path: Path) -> None:
    """Makes a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[object]:
    """Writes to a temp file beside `path`, fsyncs, then renames over it; removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)  # type: ignore[attr-defined]


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
