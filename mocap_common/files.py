"""Files that never escape their directory and never appear half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

BLOCK_BYTES = 1 << 20


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


class AtomicFile:
    """A file written under a temp name beside `path` that appears under `path` whole or not at
    all: `commit()` fsyncs it and renames it over `path`; `discard()` (or a failed commit)
    removes it. For writes that span several calls; `atomic_writer` is the one-block form."""

    def __init__(self, path: Path, mode: str = "wb", *, permissions: int | None = None) -> None:
        """`permissions`: the file's mode bits (mkstemp makes 0600), e.g. 0o644 for a shared cache."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.path = path
        self.tmp = Path(tmp_name)
        self.handle: IO[Any] = os.fdopen(fd, mode)
        self._permissions = permissions

    def sync(self) -> None:
        """Flushes, fsyncs and closes the temp file (the slow part of a commit, which calls it
        when it has not run: a caller on an event loop can run this one in a thread)."""
        if self.handle.closed:
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if self._permissions is not None:
            os.chmod(self.tmp, self._permissions)

    def commit(self) -> None:
        """Makes the file durable under `path`, replacing what was there."""
        try:
            self.sync()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except BaseException:
            self.discard()
            raise

    def commit_new(self, candidates: Iterable[Path]) -> Path:
        """Makes the file durable under the first of `candidates` (in `path`'s directory) that does
        not exist yet, and returns it. A hard link, which fails when the name exists, so two
        writers (threads or processes) never take the same name and nothing is overwritten."""
        try:
            self.sync()
            for candidate in candidates:
                try:
                    os.link(self.tmp, candidate)
                except FileExistsError:  # another writer took it
                    continue
                fsync_dir(candidate.parent)
                return candidate
            raise FileExistsError(f"no free name for {self.path.name}")
        finally:
            self.discard()

    def discard(self) -> None:
        """Removes the temp file (after a commit: the temp name only)."""
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb", *, permissions: int | None = None) -> Iterator[IO[Any]]:
    """Writes to a temp file beside `path`, fsyncs, then renames over it; removed on error."""
    file = AtomicFile(path, mode, permissions=permissions)
    try:
        yield file.handle
    except BaseException:
        file.discard()
        raise
    file.commit()


def atomic_write_bytes(path: Path, data: bytes, *, permissions: int | None = None) -> None:
    with atomic_writer(path, permissions=permissions) as handle:
        handle.write(data)


def sha256_and_size(path: Path, block: int = BLOCK_BYTES,
                    progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """The file's SHA-256 (hex) and the bytes read; `progress(n)` after each block of n bytes."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest(), size


def sha256_file(path: Path, block: int = BLOCK_BYTES, progress: Callable[[int], None] | None = None) -> str:
    """The file's SHA-256 (hex); `progress(n)` after each block of n bytes."""
    return sha256_and_size(path, block, progress)[0]
