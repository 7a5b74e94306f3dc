"""Cleaning up: the startup sweep after a crash, and the periodic retention cleanup.

Startup sweep (before the gateway serves):
- jobs RUNNING when the last process died stay RUNNING: the orchestrator claims them and resumes
  them after their last completed stage. With SQLite (one gateway per store, so no other replica
  can hold a claim) their claims are released at once; with PostgreSQL a claim lapses on its own
  after the claim TTL, and may belong to a live replica;
- QUEUED and RUNNING jobs whose input is gone end FAILED (nothing can resume them);
- ended jobs lose any intermediates a crash left behind;
- interrupted uploads are removed when they cannot be resumed: past their retention, their bytes
  gone, without a request_id (nobody can ask for them again: a gateway killed in the middle of such
  an upload left a partial file and a row that would otherwise wait out the whole retention), or
  with no byte committed (a resume would start over anyway) — unless a replica streams them now
  (their stream lease in the store is live);
- directories under jobs/ that belong to no job and no upload are removed (an upload's row is
  written before its directory, so a directory without a row is an orphan; with replicas, one
  younger than ORPHAN_MIN_AGE_S is left for the next sweep all the same).

Periodic cleanup: ended jobs past their expire time are removed, and interrupted uploads that
nobody streams any more and that are past their expire time or cannot be resumed (as above: with
replicas, an upload whose streaming replica died becomes unstreamed when its lease lapses) are
removed (the store first, then the files, so a crash in between leaves only an orphan directory,
which the next sweep removes).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import GatewayConfig
from gateway.jobs import FAILED, QUEUED, RUNNING, SUCCEEDED, TERMINAL_STATES, JobError, now_us
from gateway.layout import JobDir
from gateway.store import JobStore
from mocap_common.logs import get_logger

log = get_logger(__name__)

INPUT_LOST = JobError("INTERRUPTED", "the gateway lost the uploaded video before the job could finish; submit it again")
ORPHAN_MIN_AGE_S = 300.0


@dataclass
class SweepReport:
    resumable_jobs: int = 0
    removed_uploads: int = 0
    removed_orphans: int = 0
    expired_jobs: int = 0


class Retention:
    """Startup sweep and periodic cleanup of jobs and uploads."""

    def __init__(self, config: GatewayConfig, store: JobStore, upload_is_live: Callable[[str], bool], *,
                 exclusive: bool) -> None:
        """`exclusive`: this gateway is the store's only user (SQLite), so nothing another
        process recorded — claims, stream leases — can still be live at startup."""
        self._config = config
        self._store = store
        self._upload_is_live = upload_is_live
        self._exclusive = exclusive
        self._task: asyncio.Task[None] | None = None

    def _dir(self, job_id: str) -> JobDir:
        return JobDir(self._config.jobs_dir, job_id)

    async def startup_sweep(self) -> SweepReport:
        """Repairs what a dead process left behind. Runs before the gateway serves."""
        report = SweepReport()
        self._config.jobs_dir.mkdir(parents=True, exist_ok=True)
        for state in (QUEUED, RUNNING):
            for job in await self._store.jobs_in_state(state):
                if not self._dir(job.job_id).input(job.input_name).exists():
                    self._dir(job.job_id).remove_intermediates()
                    await self._store.transition(job.job_id, FAILED, error=INPUT_LOST)
                elif state == RUNNING and self._exclusive:
                    await self._store.release_claim(job.job_id, job.claim_token)
                    report.resumable_jobs += 1
        for state in TERMINAL_STATES:
            for job in await self._store.jobs_in_state(state):
                job_dir = self._dir(job.job_id)
                if state == SUCCEEDED:
                    job_dir.remove_tracks()
                else:
                    job_dir.remove_intermediates()
        report.removed_uploads = await self._remove_unresumable_uploads(at_startup=True)
        report.removed_orphans = await self._remove_orphans()
        report.expired_jobs = await self.cleanup()
        log.info("startup sweep", **report.__dict__)
        return report

    async def _remove_orphans(self) -> int:
        known = {u.upload_id for u in await self._store.uploads() if not u.complete}
        removed = 0
        min_age_s = 0.0 if self._exclusive else ORPHAN_MIN_AGE_S
        for entry in self._config.jobs_dir.iterdir():
            if entry.name in known or await self._store.get_job(entry.name) is not None:
                continue
            if min_age_s and time.time() - entry.lstat().st_mtime < min_age_s:
                continue
            if await self._store.get_upload(entry.name) is not None:  # started after `known` was read
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    async def _remove_unresumable_uploads(self, *, at_startup: bool = False) -> int:
        """Removes interrupted uploads nobody streams that are expired, lost their bytes, or can
        never be resumed (no request_id, or no byte committed). An upload whose stream lease is
        live is being streamed by some replica; at the startup of an exclusive (SQLite) gateway
        every lease is its own dead process's, and is released."""
        now, removed = now_us(), 0
        for upload in await self._store.uploads():
            if upload.complete or self._upload_is_live(upload.upload_id):
                continue
            if upload.stream_expire_us > now and not (at_startup and self._exclusive):
                continue
            if upload.stream_owner and at_startup and self._exclusive:
                await self._store.release_upload_stream(upload.upload_id, upload.stream_owner)
            expired = upload.expire_us <= now
            lost = upload.committed_bytes > 0 and not self._dir(upload.upload_id).partial.exists()
            unresumable = not upload.request_id or upload.committed_bytes == 0
            if expired or lost or unresumable:
                await self._remove_upload(upload.upload_id)
                removed += 1
        return removed

    async def cleanup(self) -> int:
        """Removes expired ended jobs and interrupted uploads that can no longer be resumed;
        returns the jobs removed."""
        now = now_us()
        expired = await self._store.expired_jobs(now)
        for job in expired:
            await self._store.delete_job(job.job_id)
            self._dir(job.job_id).remove()
        await self._remove_unresumable_uploads()
        if expired:
            log.info("retention removed jobs", count=len(expired))
        return len(expired)

    async def _remove_upload(self, upload_id: str) -> None:
        await self._store.delete_upload(upload_id)
        self._dir(upload_id).remove()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.retention_interval_s)
            try:
                await self.cleanup()
            except Exception:  # noqa: BLE001 - retention must keep running; the next round retries
                log.exception("retention cleanup failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
