"""The job's artifacts/ directory: the exporter's files as they stream in (each checked against
its announced size and SHA-256 before it appears under its name) and the files the gateway makes
itself, each recorded as a `common_pb2.Artifact`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from gateway.jobs import JobRecord, artifact_name, is_safe_file_name
from gateway.layout import JobDir
from gateway.stage_api import EXPORT, StageFailure
from mocap.v1 import common_pb2, exporter_pb2
from mocap_common.files import AtomicFile, atomic_write_bytes, atomic_writer, fsync_dir, sha256_and_size

T = TypeVar("T")


class ArtifactSink:
    """Writes the exporter's files into artifacts/: each through a temp file, its size and
    SHA-256 checked against the announcement before it is renamed into place."""

    def __init__(self, job: JobRecord, job_dir: JobDir) -> None:
        self._job = job
        self._dir = job_dir
        self.artifacts: list[common_pb2.Artifact] = []
        self._current: exporter_pb2.ExportedFile | None = None
        self._file: AtomicFile | None = None  # the announced file, under its temp name until end()
        self._digest = hashlib.sha256()
        self._written = 0

    def clear(self) -> None:
        """Removes artifacts/ whole: what an earlier owner of the job (a replica that died in the
        middle of the export) left there, temp files included."""
        self._close_current()
        shutil.rmtree(self._dir.artifacts, ignore_errors=True)
        self.artifacts.clear()

    async def fresh_attempt(self, call: Awaitable[T]) -> T:
        """Runs one export attempt; whatever a failed attempt left is removed first."""
        self._reset()
        try:
            return await call
        finally:
            self._close_current()

    def _reset(self) -> None:
        self._close_current()
        for artifact in self.artifacts:
            self._dir.artifact(artifact.name.rsplit("/", 1)[1]).unlink(missing_ok=True)
        self.artifacts.clear()

    async def begin(self, file: exporter_pb2.ExportedFile) -> None:
        if self._current is not None:
            await self.end()
        name = file.filename
        if not is_safe_file_name(name):
            raise StageFailure("STAGE_FAILED", "the exporter sent a file with an unsafe name", EXPORT)
        if any(a.filename == name for a in self.artifacts):
            raise StageFailure("STAGE_FAILED", f"the exporter sent {name!r} twice", EXPORT)
        if file.size_bytes < 0 or not re.fullmatch(r"[0-9a-f]{64}", file.sha256):
            raise StageFailure("STAGE_FAILED", f"the exporter announced {name!r} without a valid size and SHA-256", EXPORT)
        self._dir.artifacts.mkdir(exist_ok=True)
        self._file = AtomicFile(self._dir.artifact(name))  # committed in end(), discarded by _close_current()
        self._current, self._digest, self._written = file, hashlib.sha256(), 0

    async def write(self, offset: int, data: bytes) -> None:
        file, target = self._current, self._file
        if file is None or target is None:
            raise StageFailure("STAGE_FAILED", "the exporter sent file bytes before announcing the file", EXPORT)
        if offset != self._written or self._written + len(data) > file.size_bytes:
            raise StageFailure("STAGE_FAILED", f"the exporter sent {file.filename!r} out of order or too long", EXPORT)
        await asyncio.to_thread(target.handle.write, data)
        self._digest.update(data)
        self._written += len(data)

    async def end(self) -> None:
        """Finishes the announced file (called before the next file and after the last)."""
        file, target = self._current, self._file
        if file is None or target is None:
            return
        self._current, self._file = None, None
        if self._written != file.size_bytes or self._digest.hexdigest() != file.sha256:
            target.discard()
            raise StageFailure("STAGE_FAILED",
                               f"the exporter's file {file.filename!r} arrived corrupt (size or SHA-256 mismatch)", EXPORT)
        try:
            await asyncio.to_thread(target.sync)
        except BaseException:
            target.discard()
            raise
        target.commit()  # the rename, here rather than in the thread: a cancelled end() renames nothing
        self._record(file.filename, file.kind, file.track_id, file.size_bytes, file.sha256, file.media_type)

    def add_file(self, name: str, kind: int, media_type: str, data: bytes) -> None:
        """Adds a file the gateway itself makes."""
        self._check_free(name)
        path = self._dir.artifact(name)
        atomic_write_bytes(path, data)
        self._record(name, kind, 0, len(data), hashlib.sha256(data).hexdigest(), media_type)

    def copy_file(self, source: Path, name: str, kind: int, media_type: str) -> None:
        """Puts a file of the job's directory into artifacts/ as well (a hard link on the same file
        system, else a copy): the source stays until the job SUCCEEDED, for a replica that would
        take the job over before that."""
        self._check_free(name)
        self._dir.artifacts.mkdir(exist_ok=True)
        digest, size = sha256_and_size(source)
        target = self._dir.artifact(name)
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links (some network volumes)
            with atomic_writer(target) as out, source.open("rb") as src:
                shutil.copyfileobj(src, out)
        fsync_dir(self._dir.artifacts)
        self._record(name, kind, 0, size, digest, media_type)

    def _check_free(self, name: str) -> None:
        if any(a.filename == name for a in self.artifacts):
            raise StageFailure("STAGE_FAILED", f"the exporter sent a file named {name!r}, which the gateway writes itself", EXPORT)

    def _record(self, name: str, kind: int, track_id: int, size: int, sha256: str, media_type: str) -> None:
        self.artifacts.append(common_pb2.Artifact(
            name=artifact_name(self._job.job_id, name), kind=kind, track_id=track_id, size_bytes=size,
            sha256=sha256, media_type=media_type, filename=name))

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.discard()
        self._current, self._file = None, None


def name_stem(display_filename: str) -> str:
    """A base for artifact names from the client's file name: letters, digits, '-', '_' only."""
    stem = display_filename.rsplit(".", 1)[0] if "." in display_filename.lstrip(".") else display_filename
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:64]
    return cleaned or "take"
