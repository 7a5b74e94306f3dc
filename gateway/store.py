"""The job store: jobs, their events and artifacts, and uploads (the idempotency record).

`JobStore` is the interface the rest of the gateway uses; `SqliteJobStore` implements it on one
SQLite file in WAL mode. All calls come from the event loop's thread and are short; state
changes happen in one transaction each, and a transition names in its SQL `WHERE` the states it
may leave, so a job in a terminal state can never change again (a trigger refuses it too).

Durability: `synchronous=FULL`, so a call that returned survives a crash of the process or the
machine.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter

from gateway.jobs import (
    ACTIVE_STATES,
    ALLOWED_FROM,
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    JobError,
    JobRecord,
    UploadRecord,
    now_us,
    options_key,
    to_proto,
)
from mocap.v1 import common_pb2, gateway_pb2

JOB_TRANSITIONS = Counter("mocap_gateway_job_transitions_total", "Job state changes, by the state entered.", ["state"])
JOBS_CREATED = Counter("mocap_gateway_jobs_created_total", "Jobs created from complete uploads.")

_STATE_NAMES = {v: common_pb2.JobState.Name(v).removeprefix("JOB_STATE_") for v in common_pb2.JobState.values()}
_STATE_VALUES = {name: value for value, name in _STATE_NAMES.items()}


class JobStore(Protocol):
    """Where jobs, events, artifacts and uploads live. Every method is one atomic step."""

    # Uploads -----------------------------------------------------------------------------
    def insert_upload(self, upload: UploadRecord) -> None:
        """Records an upload that has just started (its header was valid)."""

    def get_upload(self, upload_id: str) -> UploadRecord | None: ...

    def find_upload(self, tenant: str, request_id: str) -> UploadRecord | None:
        """The tenant's upload with this request_id, active or complete."""

    def uploads(self) -> list[UploadRecord]: ...

    def set_upload_committed(self, upload_id: str, committed_bytes: int, expire_us: int) -> None:
        """Records how many bytes of an active upload are durably on disk."""

    def delete_upload(self, upload_id: str) -> None: ...

    def create_job_from_upload(self, upload_id: str, job: JobRecord) -> JobRecord:
        """Creates `job` (QUEUED, first event) and marks the upload complete, in one step."""

    def complete_upload_as(self, upload_id: str, existing_job_id: str) -> None:
        """Marks an upload complete as a duplicate of an existing job (or forgets it when it has
        no request_id to answer later)."""

    # Jobs --------------------------------------------------------------------------------
    def get_job(self, job_id: str) -> JobRecord | None: ...

    def find_duplicate(self, tenant: str, sha256: str, options_key: str) -> JobRecord | None:
        """The tenant's newest active or succeeded job with this content and options."""

    def count_active(self, tenant: str) -> int:
        """The tenant's QUEUED and RUNNING jobs."""

    def list_jobs(self, tenant: str, state: int, limit: int, after: tuple[int, str] | None) -> list[JobRecord]:
        """Newest first; `after` = (create_us, job_id) of the last job of the previous page."""

    def jobs_in_state(self, state: int) -> list[JobRecord]:
        """Every tenant's jobs in `state`, oldest first."""

    def expired_jobs(self, now: int) -> list[JobRecord]:
        """Ended jobs whose expire time has passed."""

    def transition(self, job_id: str, state: int, *, error: JobError | None = None,
                   artifacts: tuple[common_pb2.Artifact, ...] | None = None,
                   quality: common_pb2.QualityReport | None = None, message: str = "",
                   only_from: frozenset[int] | None = None) -> JobRecord | None:
        """Moves the job to `state` if its current state allows it (and is in `only_from`, when
        given), with a STATE_CHANGED event. Returns the new record; None when the job is gone or
        may not make that move."""

    def record_stage_event(self, job_id: str, event: gateway_pb2.JobEvent, progress: float) -> bool:
        """Appends a stage event to a RUNNING job and sets its stage and progress; False (and
        nothing recorded) when the job is no longer RUNNING."""

    def events_after(self, job_id: str, after_seq: int, limit: int) -> list[gateway_pb2.JobEvent]: ...

    def delete_job(self, job_id: str) -> None:
        """Removes the job, its events, artifacts and the uploads that point at it."""

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    stage INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    display_filename TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    options BLOB NOT NULL,
    options_key TEXT NOT NULL,
    input_name TEXT NOT NULL,
    video BLOB NOT NULL,
    error_reason TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    error_stage INTEGER NOT NULL DEFAULT 0,
    quality BLOB,
    create_us INTEGER NOT NULL,
    update_us INTEGER NOT NULL,
    start_us INTEGER NOT NULL DEFAULT 0,
    end_us INTEGER NOT NULL DEFAULT 0,
    expire_us INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, create_us DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_by_content ON jobs (tenant, sha256, options_key);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, create_us);

-- Nothing leaves a terminal state, whatever the statement says.
CREATE TRIGGER IF NOT EXISTS jobs_terminal_is_final BEFORE UPDATE OF state ON jobs
WHEN OLD.state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND NEW.state != OLD.state
BEGIN SELECT RAISE(ABORT, 'job is in a terminal state'); END;

CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    body BLOB NOT NULL,           -- mocap.v1.JobEvent without seq and time
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    body BLOB NOT NULL,           -- mocap.v1.Artifact
    PRIMARY KEY (job_id, position)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    display_filename TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    declared_sha256 TEXT NOT NULL,
    options BLOB NOT NULL,
    committed_bytes INTEGER NOT NULL,
    create_us INTEGER NOT NULL,
    expire_us INTEGER NOT NULL,
    job_id TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS uploads_by_request ON uploads (tenant, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS uploads_by_job ON uploads (job_id);
"""


class SqliteJobStore:
    """`JobStore` on SQLite (WAL). `on_event(job_id)` is called after every commit that added
    events to a job (the watchers' wake-up)."""

    def __init__(self, path: Path, *, job_retention_s: float, on_event: Callable[[str], None] = lambda _: None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._retention_us = int(job_retention_s * 1_000_000)
        self._on_event = on_event

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # Uploads ---------------------------------------------------------------------------------

    def insert_upload(self, upload: UploadRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO uploads (upload_id, tenant, request_id, display_filename, size_bytes, declared_sha256,"
                " options, committed_bytes, create_us, expire_us, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (upload.upload_id, upload.tenant, upload.request_id, upload.display_filename, upload.size_bytes,
                 upload.declared_sha256, upload.options.SerializeToString(deterministic=True), upload.committed_bytes,
                 upload.create_us, upload.expire_us, upload.job_id),
            )

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = self._db.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        return _upload(row) if row else None

    def find_upload(self, tenant: str, request_id: str) -> UploadRecord | None:
        row = self._db.execute("SELECT * FROM uploads WHERE tenant = ? AND request_id = ?", (tenant, request_id)).fetchone()
        return _upload(row) if row else None

    def uploads(self) -> list[UploadRecord]:
        return [_upload(r) for r in self._db.execute("SELECT * FROM uploads ORDER BY create_us")]

    def set_upload_committed(self, upload_id: str, committed_bytes: int, expire_us: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET committed_bytes = ?, expire_us = ? WHERE upload_id = ? AND job_id = ''",
                       (committed_bytes, expire_us, upload_id))

    def delete_upload(self, upload_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))

    def create_job_from_upload(self, upload_id: str, job: JobRecord) -> JobRecord:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (job_id, tenant, state, display_filename, request_id, size_bytes, sha256, options,"
                " options_key, input_name, video, create_us, update_us) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.job_id, job.tenant, _STATE_NAMES[job.state], job.display_filename, job.request_id, job.size_bytes,
                 job.sha256, job.options.SerializeToString(deterministic=True), options_key(job.options),
                 job.input_name, job.video.SerializeToString(), job.create_us, job.create_us),
            )
            self._finish_upload(db, upload_id, job.job_id)
            self._append(db, job.job_id, _state_event(job), job.create_us)
        JOBS_CREATED.inc()
        JOB_TRANSITIONS.labels(_STATE_NAMES[job.state]).inc()
        self._on_event(job.job_id)
        return job

    def complete_upload_as(self, upload_id: str, existing_job_id: str) -> None:
        with self._tx() as db:
            self._finish_upload(db, upload_id, existing_job_id)

    @staticmethod
    def _finish_upload(db: sqlite3.Connection, upload_id: str, job_id: str) -> None:
        # Only an upload with a request_id is answered again later; the others are forgotten.
        db.execute("UPDATE uploads SET job_id = ?, committed_bytes = size_bytes WHERE upload_id = ? AND request_id != ''",
                   (job_id, upload_id))
        db.execute("DELETE FROM uploads WHERE upload_id = ? AND request_id = ''", (upload_id,))

    # Jobs --------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return self._jobs([row])[0] if row else None

    def find_duplicate(self, tenant: str, sha256: str, options_key: str) -> JobRecord | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE tenant = ? AND sha256 = ? AND options_key = ?"
            " AND state IN ('QUEUED', 'RUNNING', 'SUCCEEDED') ORDER BY create_us DESC LIMIT 1",
            (tenant, sha256, options_key),
        ).fetchone()
        return self._jobs([row])[0] if row else None

    def count_active(self, tenant: str) -> int:
        return self._db.execute(
            "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN ('QUEUED', 'RUNNING')", (tenant,)
        ).fetchone()[0]

    def list_jobs(self, tenant: str, state: int, limit: int, after: tuple[int, str] | None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE tenant = ?", [tenant]
        if state:
            sql += " AND state = ?"
            args.append(_STATE_NAMES[state])
        if after is not None:
            sql += " AND (create_us < ? OR (create_us = ? AND job_id < ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY create_us DESC, job_id DESC LIMIT ?"
        args.append(limit)
        return self._jobs(self._db.execute(sql, args).fetchall())

    def jobs_in_state(self, state: int) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY create_us, job_id", (_STATE_NAMES[state],))
        return self._jobs(rows.fetchall())

    def expired_jobs(self, now: int) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND expire_us > 0 AND expire_us <= ?",
            (now,),
        )
        return self._jobs(rows.fetchall())

    def transition(self, job_id: str, state: int, *, error: JobError | None = None,
                   artifacts: tuple[common_pb2.Artifact, ...] | None = None,
                   quality: common_pb2.QualityReport | None = None, message: str = "",
                   only_from: frozenset[int] | None = None) -> JobRecord | None:
        now = now_us()
        with self._tx() as db:
            allowed_from = ALLOWED_FROM[state] if only_from is None else ALLOWED_FROM[state] & only_from
            current = self.get_job(job_id)
            if current is None or current.state not in allowed_from:
                return None
            new = current.with_changes(state=state, update_us=now)
            if state == RUNNING:
                new = new.with_changes(start_us=now)
            if state in TERMINAL_STATES:
                new = new.with_changes(end_us=now, expire_us=now + self._retention_us)
            if state == SUCCEEDED:
                new = new.with_changes(stage=common_pb2.JOB_STAGE_UNSPECIFIED, progress=1.0,
                                       artifacts=artifacts or (), quality=quality)
            elif state in (FAILED, CANCELLED):
                stage = error.stage if error is not None else common_pb2.JOB_STAGE_UNSPECIFIED
                new = new.with_changes(stage=stage, error=error)
            allowed = ",".join(f"'{_STATE_NAMES[s]}'" for s in allowed_from)
            updated = db.execute(
                "UPDATE jobs SET state = ?, stage = ?, progress = ?, error_reason = ?, error_message = ?,"
                " error_stage = ?, quality = ?, update_us = ?, start_us = ?, end_us = ?, expire_us = ?"
                f" WHERE job_id = ? AND state IN ({allowed})",
                (_STATE_NAMES[state], new.stage, new.progress, new.error.reason if new.error else "",
                 new.error.message if new.error else "", new.error.stage if new.error else 0,
                 new.quality.SerializeToString() if new.quality is not None else None,
                 new.update_us, new.start_us, new.end_us, new.expire_us, job_id),
            ).rowcount
            if updated != 1:
                return None
            for position, artifact in enumerate(new.artifacts):
                db.execute("INSERT INTO artifacts (job_id, position, body) VALUES (?,?,?)",
                           (job_id, position, artifact.SerializeToString()))
            self._append(db, job_id, _state_event(new, message), now)
        JOB_TRANSITIONS.labels(_STATE_NAMES[state]).inc()
        self._on_event(job_id)
        return new

    def record_stage_event(self, job_id: str, event: gateway_pb2.JobEvent, progress: float) -> bool:
        now = now_us()
        with self._tx() as db:
            updated = db.execute(
                "UPDATE jobs SET stage = ?, progress = ?, update_us = ? WHERE job_id = ? AND state = 'RUNNING'",
                (event.stage, progress, now, job_id),
            ).rowcount
            if updated != 1:
                return False
            event.state = RUNNING
            self._append(db, job_id, event, now)
        self._on_event(job_id)
        return True

    def events_after(self, job_id: str, after_seq: int, limit: int) -> list[gateway_pb2.JobEvent]:
        rows = self._db.execute(
            "SELECT seq, time_us, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after_seq, limit),
        )
        events = []
        for row in rows:
            event = gateway_pb2.JobEvent.FromString(row["body"])
            event.seq = row["seq"]
            event.time.FromMicroseconds(row["time_us"])
            events.append(event)
        return events

    def delete_job(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM uploads WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    # Helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _append(db: sqlite3.Connection, job_id: str, event: gateway_pb2.JobEvent, time_us: int) -> int:
        event.ClearField("seq")
        event.ClearField("time")
        return db.execute(
            "INSERT INTO events (job_id, seq, time_us, body) VALUES"
            " (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?), ?, ?) RETURNING seq",
            (job_id, job_id, time_us, event.SerializeToString()),
        ).fetchone()[0]

    def _jobs(self, rows: list[sqlite3.Row]) -> list[JobRecord]:
        if not rows:
            return []
        ids = [r["job_id"] for r in rows]
        artifacts: dict[str, list[common_pb2.Artifact]] = {}
        placeholders = ",".join("?" * len(ids))
        for a in self._db.execute(f"SELECT job_id, body FROM artifacts WHERE job_id IN ({placeholders}) ORDER BY job_id, position", ids):
            artifacts.setdefault(a["job_id"], []).append(common_pb2.Artifact.FromString(a["body"]))
        return [_job(r, tuple(artifacts.get(r["job_id"], ()))) for r in rows]


def _state_event(job: JobRecord, message: str = "") -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(
        type=gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED,
        state=job.state,
        stage=job.stage,
        message=message or (job.error.message if job.error else ""),
        job=to_proto(job),
    )


def _job(row: sqlite3.Row, artifacts: tuple[common_pb2.Artifact, ...]) -> JobRecord:
    error = JobError(row["error_reason"], row["error_message"], row["error_stage"]) if row["error_reason"] else None
    return JobRecord(
        job_id=row["job_id"],
        tenant=row["tenant"],
        state=_STATE_VALUES[row["state"]],
        display_filename=row["display_filename"],
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
        options=common_pb2.JobOptions.FromString(row["options"]),
        input_name=row["input_name"],
        video=common_pb2.VideoInfo.FromString(row["video"]),
        create_us=row["create_us"],
        request_id=row["request_id"],
        stage=row["stage"],
        progress=row["progress"],
        error=error,
        artifacts=artifacts,
        quality=common_pb2.QualityReport.FromString(row["quality"]) if row["quality"] is not None else None,
        update_us=row["update_us"],
        start_us=row["start_us"],
        end_us=row["end_us"],
        expire_us=row["expire_us"],
    )


def _upload(row: sqlite3.Row) -> UploadRecord:
    return UploadRecord(
        upload_id=row["upload_id"],
        tenant=row["tenant"],
        request_id=row["request_id"],
        display_filename=row["display_filename"],
        size_bytes=row["size_bytes"],
        declared_sha256=row["declared_sha256"],
        options=common_pb2.JobOptions.FromString(row["options"]),
        committed_bytes=row["committed_bytes"],
        create_us=row["create_us"],
        expire_us=row["expire_us"],
        job_id=row["job_id"],
    )


__all__ = ["JobStore", "SqliteJobStore", "ACTIVE_STATES"]
