"""The job store: jobs, their events and artifacts, uploads (the idempotency record), and the
claims by which gateway replicas execute jobs.

`JobStore` is the interface the rest of the gateway uses. Two implementations:
- `SqliteJobStore` (here): one SQLite file in WAL mode, the embedded default for one gateway;
- `PostgresJobStore` (`gateway.store_pg`): PostgreSQL through asyncpg, for several gateway
  replicas sharing one database. `open_job_store` picks one from the configuration.

Every method is one transaction. A state transition names in its `WHERE` the states it may leave,
so a job in a terminal state never changes again (a trigger refuses it too). Each job's events
are numbered from the job row's `last_seq` counter inside the transaction that writes them, so
`seq` has no gap and no duplicate whichever replica writes.

Durable execution: a replica *claims* a job (QUEUED, or RUNNING with a claim that lapsed) with a
fresh token and a lease, renews the lease while it works, and names the token in every write it
makes for the job (`claim_token=`), so a replica that lost its claim cannot write any more. What
a finished stage produced is recorded as the job's checkpoint, so whoever claims it next resumes
after that stage.

Schema: versioned migrations (`schema_migrations`), applied at open, each in one transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter

from gateway.jobs import (
    ACTIVE_STATES,
    ALLOWED_FROM,
    CANCELLED,
    FAILED,
    QUEUED,
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
JOB_TAKEOVERS = Counter("mocap_gateway_job_takeovers_total", "RUNNING jobs claimed after their previous claim lapsed.")

STATE_NAMES = {v: common_pb2.JobState.Name(v).removeprefix("JOB_STATE_") for v in common_pb2.JobState.values()}
STATE_VALUES = {name: value for value, name in STATE_NAMES.items()}
TERMINAL_NAMES = tuple(STATE_NAMES[s] for s in (SUCCEEDED, FAILED, CANCELLED))


class RequestIdTaken(Exception):
    """Another upload of the tenant already holds this request_id (a concurrent CreateJob,
    possibly on another replica)."""


class TooManyActive(Exception):
    """The tenant is at its limit of active jobs and streaming uploads."""

    def __init__(self, active: int) -> None:
        super().__init__(f"{active} active")
        self.active = active


class JobStore(Protocol):
    """Where jobs, events, artifacts, uploads and claims live. Every method is one atomic step."""

    # Uploads -----------------------------------------------------------------------------
    async def insert_upload(self, upload: UploadRecord, max_active: int = 0) -> None:
        """Records an upload that has just started (its header was valid), streamed by
        `upload.stream_owner` until `upload.stream_expire_us`. With `max_active` > 0 it is refused
        with TooManyActive when the tenant already has that many active jobs and streaming
        uploads; RequestIdTaken when the tenant's request_id is already used."""

    async def claim_upload_stream(self, upload_id: str, owner: str, expire_us: int, max_active: int = 0) -> bool:
        """Makes `owner` the streamer of an interrupted upload (a resume). False when another
        stream holds it now or it is complete; TooManyActive as in insert_upload (the upload
        itself not counted)."""

    async def renew_upload_streams(self, owner: str, upload_ids: list[str], expire_us: int) -> None:
        """Extends the stream leases `owner` holds on these uploads."""

    async def release_upload_stream(self, upload_id: str, owner: str) -> None:
        """Ends `owner`'s stream lease on the upload (the stream ended)."""

    async def get_upload(self, upload_id: str) -> UploadRecord | None: ...

    async def find_upload(self, tenant: str, request_id: str) -> UploadRecord | None:
        """The tenant's upload with this request_id, active or complete."""

    async def uploads(self) -> list[UploadRecord]: ...

    async def set_upload_committed(self, upload_id: str, committed_bytes: int, expire_us: int) -> None:
        """Records how many bytes of an active upload are durably on disk."""

    async def delete_upload(self, upload_id: str) -> None: ...

    async def create_job_from_upload(self, upload_id: str, job: JobRecord) -> JobRecord:
        """Creates `job` (QUEUED, first event) and marks the upload complete, in one step — unless
        the tenant already has a QUEUED or RUNNING job of the same content and options (made
        meanwhile, possibly by another replica): then the upload completes as that job, which is
        returned instead (compare job_id)."""

    async def complete_upload_as(self, upload_id: str, existing_job_id: str) -> None:
        """Marks an upload complete as a duplicate of an existing job (or forgets it when it has
        no request_id to answer later)."""

    # Jobs --------------------------------------------------------------------------------
    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def find_duplicate(self, tenant: str, sha256: str, options_key: str) -> JobRecord | None:
        """The tenant's newest active or succeeded job with this content and options."""

    async def count_active(self, tenant: str) -> int:
        """The tenant's QUEUED and RUNNING jobs plus its uploads streaming now (any replica)."""

    async def list_jobs(self, tenant: str, state: int, limit: int, after: tuple[int, str] | None) -> list[JobRecord]:
        """Newest first; `after` = (create_us, job_id) of the last job of the previous page."""

    async def jobs_in_state(self, state: int) -> list[JobRecord]:
        """Every tenant's jobs in `state`, oldest first."""

    async def expired_jobs(self, now: int) -> list[JobRecord]:
        """Ended jobs whose expire time has passed."""

    async def claim_job(self, owner: str, token: str, expire_us: int) -> JobRecord | None:
        """Claims the next job to execute for `owner` with `token` until `expire_us`: a RUNNING job
        whose claim lapsed (taken over: a RESUMED event; first), else the oldest QUEUED job (moved
        to RUNNING with a STATE_CHANGED event). None when there is none. `claims` counts up."""

    async def renew_claims(self, owner: str, tokens: Mapping[str, str], expire_us: int) -> set[str]:
        """Extends `owner`'s claims (job id → token); returns the ids still held (RUNNING, same
        token). A job missing from the answer was cancelled, ended or taken over."""

    async def release_claim(self, job_id: str, token: str) -> None:
        """Gives up a claim now (the replica is stopping): any replica may claim the job at once."""

    async def record_checkpoint(self, job_id: str, token: str, stage: int, checkpoint: bytes) -> bool:
        """Records that `stage` finished and its output is stored; False when the claim is lost."""

    async def transition(self, job_id: str, state: int, *, error: JobError | None = None,
                         artifacts: tuple[common_pb2.Artifact, ...] | None = None,
                         quality: common_pb2.QualityReport | None = None, message: str = "",
                         only_from: frozenset[int] | None = None, claim_token: str | None = None) -> JobRecord | None:
        """Moves the job to `state` if its current state allows it (and is in `only_from`, when
        given, and its claim is `claim_token`, when given), with a STATE_CHANGED event. A terminal
        state ends the claim. Returns the new record; None when the job is gone or may not make
        that move."""

    async def record_stage_event(self, job_id: str, event: gateway_pb2.JobEvent, progress: float,
                                 claim_token: str | None = None) -> bool:
        """Appends a stage event to a RUNNING job (claimed with `claim_token`, when given) and sets
        its stage and progress; False (and nothing recorded) otherwise."""

    async def events_after(self, job_id: str, after_seq: int, limit: int) -> list[gateway_pb2.JobEvent]: ...

    async def delete_job(self, job_id: str) -> None:
        """Removes the job, its events, artifacts and the uploads that point at it."""

    async def schema_version(self) -> int:
        """The newest migration applied."""

    async def close(self) -> None: ...


async def open_job_store(database_url: str, sqlite_path: Path, *, job_retention_s: float,
                         on_event: Callable[[str], None] = lambda _: None) -> JobStore:
    """PostgreSQL when `database_url` is set, else SQLite at `sqlite_path`; migrated, ready."""
    if database_url:
        from gateway.store_pg import PostgresJobStore  # asyncpg: only the replicated setup needs it

        return await PostgresJobStore.open(database_url, job_retention_s=job_retention_s, on_event=on_event)
    return SqliteJobStore(sqlite_path, job_retention_s=job_retention_s, on_event=on_event)


# ---------------------------------------------------------------------------------------------
# Shared by both implementations


def state_event(job: JobRecord, message: str = "") -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(
        type=gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED,
        state=job.state,
        stage=job.stage,
        message=message or (job.error.message if job.error else ""),
        job=to_proto(job),
    )


def resumed_event(job: JobRecord) -> gateway_pb2.JobEvent:
    after = common_pb2.JobStage.Name(job.completed_stage).removeprefix("JOB_STAGE_").lower() if job.completed_stage else ""
    where = f"after its {after} stage" if after else "from its first stage"
    return gateway_pb2.JobEvent(
        type=gateway_pb2.JOB_EVENT_TYPE_RESUMED, state=RUNNING, stage=job.completed_stage, attempt=job.claims,
        message=f"the gateway running this job stopped; another one took it over and resumes it {where}",
    )


def event_body(event: gateway_pb2.JobEvent) -> bytes:
    """What is stored of an event: everything but seq and time, which are columns."""
    event.ClearField("seq")
    event.ClearField("time")
    return event.SerializeToString()


def event_from_row(seq: int, time_us: int, body: bytes) -> gateway_pb2.JobEvent:
    event = gateway_pb2.JobEvent.FromString(body)
    event.seq = seq
    event.time.FromMicroseconds(time_us)
    return event


def transitioned(current: JobRecord, state: int, now: int, retention_us: int, *, error: JobError | None,
                 artifacts: tuple[common_pb2.Artifact, ...] | None,
                 quality: common_pb2.QualityReport | None) -> JobRecord:
    """The record after a transition to `state` (the store then writes it)."""
    new = current.with_changes(state=state, update_us=now)
    if state == RUNNING:
        new = new.with_changes(start_us=now)
    if state in TERMINAL_STATES:
        new = new.with_changes(end_us=now, expire_us=now + retention_us, claim_owner="", claim_token="", claim_expire_us=0)
    if state == SUCCEEDED:
        new = new.with_changes(stage=common_pb2.JOB_STAGE_UNSPECIFIED, progress=1.0, artifacts=artifacts or (), quality=quality)
    elif state in (FAILED, CANCELLED):
        stage = error.stage if error is not None else common_pb2.JOB_STAGE_UNSPECIFIED
        new = new.with_changes(stage=stage, error=error)
    return new


def job_from_row(row: Mapping[str, Any], artifacts: tuple[common_pb2.Artifact, ...]) -> JobRecord:
    error = JobError(row["error_reason"], row["error_message"], row["error_stage"]) if row["error_reason"] else None
    return JobRecord(
        job_id=row["job_id"], tenant=row["tenant"], state=STATE_VALUES[row["state"]],
        display_filename=row["display_filename"], size_bytes=row["size_bytes"], sha256=row["sha256"],
        options=common_pb2.JobOptions.FromString(bytes(row["options"])), input_name=row["input_name"],
        video=common_pb2.VideoInfo.FromString(bytes(row["video"])), create_us=row["create_us"],
        request_id=row["request_id"], stage=row["stage"], progress=row["progress"], error=error, artifacts=artifacts,
        quality=common_pb2.QualityReport.FromString(bytes(row["quality"])) if row["quality"] is not None else None,
        update_us=row["update_us"], start_us=row["start_us"], end_us=row["end_us"], expire_us=row["expire_us"],
        claim_owner=row["claim_owner"], claim_token=row["claim_token"], claim_expire_us=row["claim_expire_us"],
        claims=row["claims"], completed_stage=row["completed_stage"], checkpoint=bytes(row["checkpoint"]),
    )


def upload_from_row(row: Mapping[str, Any]) -> UploadRecord:
    return UploadRecord(
        upload_id=row["upload_id"], tenant=row["tenant"], request_id=row["request_id"],
        display_filename=row["display_filename"], size_bytes=row["size_bytes"], declared_sha256=row["declared_sha256"],
        options=common_pb2.JobOptions.FromString(bytes(row["options"])), committed_bytes=row["committed_bytes"],
        create_us=row["create_us"], expire_us=row["expire_us"], job_id=row["job_id"],
        stream_owner=row["stream_owner"], stream_expire_us=row["stream_expire_us"],
    )


def count_transition(state: int) -> None:
    JOB_TRANSITIONS.labels(STATE_NAMES[state]).inc()


# ---------------------------------------------------------------------------------------------
# SQLite

# Each migration runs once, in order, in one transaction; never edit one that was released, add
# the next. Version 1 is the schema of the first release (IF NOT EXISTS: a database made before
# migrations were tracked adopts it as is).
SQLITE_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
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
CREATE TRIGGER IF NOT EXISTS jobs_terminal_is_final BEFORE UPDATE OF state ON jobs
WHEN OLD.state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND NEW.state != OLD.state
BEGIN SELECT RAISE(ABORT, 'job is in a terminal state'); END;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    body BLOB NOT NULL,
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
"""),
    # Durable execution: per-job event counter, claims, checkpoints; upload stream leases.
    (2, """
ALTER TABLE jobs ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET last_seq = (SELECT COALESCE(MAX(seq), 0) FROM events WHERE events.job_id = jobs.job_id);
ALTER TABLE jobs ADD COLUMN claim_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN claim_token TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN claim_expire_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN completed_stage INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN checkpoint BLOB NOT NULL DEFAULT x'';
ALTER TABLE uploads ADD COLUMN stream_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE uploads ADD COLUMN stream_expire_us INTEGER NOT NULL DEFAULT 0;
"""),
)

_SQLITE_ACTIVE_UPLOADS = "SELECT COUNT(*) FROM uploads WHERE tenant = ? AND job_id = '' AND stream_expire_us > ?"


class SqliteJobStore:
    """`JobStore` on SQLite (WAL), for one gateway process. `on_event(job_id)` is called after
    every commit that added events to a job (the watchers' wake-up). Calls are short and run on
    the event loop's thread. Durability: `synchronous=FULL`, so a call that returned survives a
    crash of the process or the machine."""

    def __init__(self, path: Path, *, job_retention_s: float, on_event: Callable[[str], None] = lambda _: None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._retention_us = int(job_retention_s * 1_000_000)
        self._on_event = on_event

    def _migrate(self) -> None:
        self._db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL)")
        with self._tx() as db:
            done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, sql in SQLITE_MIGRATIONS:
                if version in done:
                    continue
                for statement in _statements(sql):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations (version, applied_us) VALUES (?, ?)", (version, now_us()))

    async def schema_version(self) -> int:
        return self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]

    async def close(self) -> None:
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

    async def insert_upload(self, upload: UploadRecord, max_active: int = 0) -> None:
        with self._tx() as db:
            self._check_active(db, upload.tenant, max_active)
            try:
                db.execute(
                    "INSERT INTO uploads (upload_id, tenant, request_id, display_filename, size_bytes, declared_sha256,"
                    " options, committed_bytes, create_us, expire_us, job_id, stream_owner, stream_expire_us)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (upload.upload_id, upload.tenant, upload.request_id, upload.display_filename, upload.size_bytes,
                     upload.declared_sha256, upload.options.SerializeToString(deterministic=True), upload.committed_bytes,
                     upload.create_us, upload.expire_us, upload.job_id, upload.stream_owner, upload.stream_expire_us),
                )
            except sqlite3.IntegrityError as exc:
                if "uploads.tenant" in str(exc) or "uploads_by_request" in str(exc):
                    raise RequestIdTaken(upload.request_id) from None
                raise

    async def claim_upload_stream(self, upload_id: str, owner: str, expire_us: int, max_active: int = 0) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT tenant FROM uploads WHERE upload_id = ? AND job_id = '' AND stream_expire_us <= ?",
                             (upload_id, now_us())).fetchone()
            if row is None:
                return False
            self._check_active(db, row["tenant"], max_active)
            db.execute("UPDATE uploads SET stream_owner = ?, stream_expire_us = ? WHERE upload_id = ?",
                       (owner, expire_us, upload_id))
            return True

    async def renew_upload_streams(self, owner: str, upload_ids: list[str], expire_us: int) -> None:
        with self._tx() as db:
            db.executemany("UPDATE uploads SET stream_expire_us = ? WHERE upload_id = ? AND stream_owner = ?",
                           [(expire_us, upload_id, owner) for upload_id in upload_ids])

    async def release_upload_stream(self, upload_id: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET stream_owner = '', stream_expire_us = 0 WHERE upload_id = ? AND stream_owner = ?",
                       (upload_id, owner))

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = self._db.execute("SELECT * FROM uploads WHERE upload_id = ?", (upload_id,)).fetchone()
        return upload_from_row(row) if row else None

    async def find_upload(self, tenant: str, request_id: str) -> UploadRecord | None:
        row = self._db.execute("SELECT * FROM uploads WHERE tenant = ? AND request_id = ?", (tenant, request_id)).fetchone()
        return upload_from_row(row) if row else None

    async def uploads(self) -> list[UploadRecord]:
        return [upload_from_row(r) for r in self._db.execute("SELECT * FROM uploads ORDER BY create_us, upload_id")]

    async def set_upload_committed(self, upload_id: str, committed_bytes: int, expire_us: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET committed_bytes = ?, expire_us = ? WHERE upload_id = ? AND job_id = ''",
                       (committed_bytes, expire_us, upload_id))

    async def delete_upload(self, upload_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))

    async def create_job_from_upload(self, upload_id: str, job: JobRecord) -> JobRecord:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE tenant = ? AND sha256 = ? AND options_key = ? AND state IN ('QUEUED', 'RUNNING')"
                " ORDER BY create_us DESC LIMIT 1", (job.tenant, job.sha256, options_key(job.options))).fetchone()
            if row is not None:
                self._finish_upload(db, upload_id, row["job_id"])
                return self._jobs([row])[0]
            db.execute(
                "INSERT INTO jobs (job_id, tenant, state, display_filename, request_id, size_bytes, sha256, options,"
                " options_key, input_name, video, create_us, update_us) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job.job_id, job.tenant, STATE_NAMES[job.state], job.display_filename, job.request_id, job.size_bytes,
                 job.sha256, job.options.SerializeToString(deterministic=True), options_key(job.options),
                 job.input_name, job.video.SerializeToString(), job.create_us, job.create_us),
            )
            self._finish_upload(db, upload_id, job.job_id)
            self._append(db, job.job_id, state_event(job), job.create_us)
        JOBS_CREATED.inc()
        count_transition(job.state)
        self._on_event(job.job_id)
        return job.with_changes(update_us=job.create_us)

    async def complete_upload_as(self, upload_id: str, existing_job_id: str) -> None:
        with self._tx() as db:
            self._finish_upload(db, upload_id, existing_job_id)

    @staticmethod
    def _finish_upload(db: sqlite3.Connection, upload_id: str, job_id: str) -> None:
        # Only an upload with a request_id is answered again later; the others are forgotten.
        db.execute("UPDATE uploads SET job_id = ?, committed_bytes = size_bytes, stream_owner = '', stream_expire_us = 0"
                   " WHERE upload_id = ? AND request_id != ''", (job_id, upload_id))
        db.execute("DELETE FROM uploads WHERE upload_id = ? AND request_id = ''", (upload_id,))

    def _check_active(self, db: sqlite3.Connection, tenant: str, max_active: int) -> None:
        if max_active > 0:
            active = self._count_active(db, tenant)
            if active >= max_active:
                raise TooManyActive(active)

    @staticmethod
    def _count_active(db: sqlite3.Connection, tenant: str) -> int:
        jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN ('QUEUED', 'RUNNING')", (tenant,)).fetchone()[0]
        return jobs + db.execute(_SQLITE_ACTIVE_UPLOADS, (tenant, now_us())).fetchone()[0]

    # Jobs --------------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        return self._get_job(job_id)

    def _get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return self._jobs([row])[0] if row else None

    async def find_duplicate(self, tenant: str, sha256: str, options_key: str) -> JobRecord | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE tenant = ? AND sha256 = ? AND options_key = ?"
            " AND state IN ('QUEUED', 'RUNNING', 'SUCCEEDED') ORDER BY create_us DESC LIMIT 1",
            (tenant, sha256, options_key),
        ).fetchone()
        return self._jobs([row])[0] if row else None

    async def count_active(self, tenant: str) -> int:
        return self._count_active(self._db, tenant)

    async def list_jobs(self, tenant: str, state: int, limit: int, after: tuple[int, str] | None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE tenant = ?", [tenant]
        if state:
            sql += " AND state = ?"
            args.append(STATE_NAMES[state])
        if after is not None:
            sql += " AND (create_us < ? OR (create_us = ? AND job_id < ?))"
            args += [after[0], after[0], after[1]]
        sql += " ORDER BY create_us DESC, job_id DESC LIMIT ?"
        args.append(limit)
        return self._jobs(self._db.execute(sql, args).fetchall())

    async def jobs_in_state(self, state: int) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY create_us, job_id", (STATE_NAMES[state],))
        return self._jobs(rows.fetchall())

    async def expired_jobs(self, now: int) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND expire_us > 0 AND expire_us <= ?",
            (now,),
        )
        return self._jobs(rows.fetchall())

    async def claim_job(self, owner: str, token: str, expire_us: int) -> JobRecord | None:
        now = now_us()
        with self._tx() as db:
            row = db.execute(
                "SELECT job_id, state FROM jobs WHERE state = 'QUEUED' OR (state = 'RUNNING' AND claim_expire_us <= ?)"
                " ORDER BY state = 'RUNNING' DESC, create_us, job_id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            job_id, takeover = row["job_id"], row["state"] == "RUNNING"
            if takeover:
                db.execute("UPDATE jobs SET claim_owner = ?, claim_token = ?, claim_expire_us = ?, claims = claims + 1,"
                           " update_us = ? WHERE job_id = ?", (owner, token, expire_us, now, job_id))
                job = self._get_job(job_id)
                assert job is not None
                self._append(db, job_id, resumed_event(job), now)
            else:
                db.execute("UPDATE jobs SET state = 'RUNNING', claim_owner = ?, claim_token = ?, claim_expire_us = ?,"
                           " claims = claims + 1, update_us = ?, start_us = ? WHERE job_id = ?",
                           (owner, token, expire_us, now, now, job_id))
                job = self._get_job(job_id)
                assert job is not None
                self._append(db, job_id, state_event(job), now)
        if takeover:
            JOB_TAKEOVERS.inc()
        else:
            count_transition(RUNNING)
        self._on_event(job_id)
        return job

    async def renew_claims(self, owner: str, tokens: Mapping[str, str], expire_us: int) -> set[str]:
        held: set[str] = set()
        with self._tx() as db:
            for job_id, token in tokens.items():
                if db.execute("UPDATE jobs SET claim_expire_us = ? WHERE job_id = ? AND state = 'RUNNING'"
                              " AND claim_owner = ? AND claim_token = ?", (expire_us, job_id, owner, token)).rowcount:
                    held.add(job_id)
        return held

    async def release_claim(self, job_id: str, token: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET claim_expire_us = 0 WHERE job_id = ? AND state = 'RUNNING' AND claim_token = ?",
                       (job_id, token))

    async def record_checkpoint(self, job_id: str, token: str, stage: int, checkpoint: bytes) -> bool:
        with self._tx() as db:
            return db.execute("UPDATE jobs SET completed_stage = ?, checkpoint = ? WHERE job_id = ? AND state = 'RUNNING'"
                              " AND claim_token = ?", (stage, checkpoint, job_id, token)).rowcount == 1

    async def transition(self, job_id: str, state: int, *, error: JobError | None = None,
                         artifacts: tuple[common_pb2.Artifact, ...] | None = None,
                         quality: common_pb2.QualityReport | None = None, message: str = "",
                         only_from: frozenset[int] | None = None, claim_token: str | None = None) -> JobRecord | None:
        now = now_us()
        with self._tx() as db:
            allowed_from = ALLOWED_FROM[state] if only_from is None else ALLOWED_FROM[state] & only_from
            current = self._get_job(job_id)
            if current is None or current.state not in allowed_from:
                return None
            if claim_token is not None and current.claim_token != claim_token:
                return None
            new = transitioned(current, state, now, self._retention_us, error=error, artifacts=artifacts, quality=quality)
            allowed = ",".join(f"'{STATE_NAMES[s]}'" for s in allowed_from)
            updated = db.execute(
                "UPDATE jobs SET state = ?, stage = ?, progress = ?, error_reason = ?, error_message = ?,"
                " error_stage = ?, quality = ?, update_us = ?, start_us = ?, end_us = ?, expire_us = ?,"
                " claim_owner = ?, claim_token = ?, claim_expire_us = ?"
                f" WHERE job_id = ? AND state IN ({allowed})",
                (STATE_NAMES[state], new.stage, new.progress, new.error.reason if new.error else "",
                 new.error.message if new.error else "", new.error.stage if new.error else 0,
                 new.quality.SerializeToString() if new.quality is not None else None,
                 new.update_us, new.start_us, new.end_us, new.expire_us, new.claim_owner, new.claim_token,
                 new.claim_expire_us, job_id),
            ).rowcount
            if updated != 1:
                return None
            for position, artifact in enumerate(new.artifacts):
                db.execute("INSERT INTO artifacts (job_id, position, body) VALUES (?,?,?)",
                           (job_id, position, artifact.SerializeToString()))
            self._append(db, job_id, state_event(new, message), now)
        count_transition(state)
        self._on_event(job_id)
        return new

    async def record_stage_event(self, job_id: str, event: gateway_pb2.JobEvent, progress: float,
                                 claim_token: str | None = None) -> bool:
        now = now_us()
        with self._tx() as db:
            sql, args = "UPDATE jobs SET stage = ?, progress = ?, update_us = ? WHERE job_id = ? AND state = 'RUNNING'", \
                [event.stage, progress, now, job_id]
            if claim_token is not None:
                sql += " AND claim_token = ?"
                args.append(claim_token)
            if db.execute(sql, args).rowcount != 1:
                return False
            event.state = RUNNING
            self._append(db, job_id, event, now)
        self._on_event(job_id)
        return True

    async def events_after(self, job_id: str, after_seq: int, limit: int) -> list[gateway_pb2.JobEvent]:
        rows = self._db.execute(
            "SELECT seq, time_us, body FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after_seq, limit),
        )
        return [event_from_row(row["seq"], row["time_us"], row["body"]) for row in rows]

    async def delete_job(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM artifacts WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM uploads WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    # Helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _append(db: sqlite3.Connection, job_id: str, event: gateway_pb2.JobEvent, time_us: int) -> int:
        seq = db.execute("UPDATE jobs SET last_seq = last_seq + 1 WHERE job_id = ? RETURNING last_seq", (job_id,)).fetchone()[0]
        db.execute("INSERT INTO events (job_id, seq, time_us, body) VALUES (?, ?, ?, ?)",
                   (job_id, seq, time_us, event_body(event)))
        return seq

    def _jobs(self, rows: list[sqlite3.Row]) -> list[JobRecord]:
        if not rows:
            return []
        ids = [r["job_id"] for r in rows]
        artifacts: dict[str, list[common_pb2.Artifact]] = {}
        placeholders = ",".join("?" * len(ids))
        for a in self._db.execute(f"SELECT job_id, body FROM artifacts WHERE job_id IN ({placeholders}) ORDER BY job_id, position", ids):
            artifacts.setdefault(a["job_id"], []).append(common_pb2.Artifact.FromString(a["body"]))
        return [job_from_row(r, tuple(artifacts.get(r["job_id"], ()))) for r in rows]


def _statements(sql: str) -> list[str]:
    """A migration's statements (sqlite3 runs one per execute; the trigger body keeps its ';')."""
    statements, current = [], []
    for line in sql.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")):
            statements.append(text)
            current = []
    return statements


__all__ = ["ACTIVE_STATES", "QUEUED", "JobStore", "RequestIdTaken", "SqliteJobStore", "TooManyActive", "open_job_store"]
