"""`JobStore` on PostgreSQL (asyncpg), for several gateway replicas sharing one database.

It behaves as `gateway.store.SqliteJobStore` does, method by method (same conditions, same
events, same counters); what differs is how it stays correct when several processes write at once:

- every write is one READ COMMITTED transaction on a pooled connection;
- a job's events are numbered by `UPDATE jobs SET last_seq = last_seq + 1 ... RETURNING`, which
  locks the job row until commit: no gap, no duplicate, and a reader never sees seq n+1 before n;
- `claim_job` picks its job with `FOR UPDATE SKIP LOCKED`, so two replicas never claim the same one;
- the tenant limit (insert_upload, claim_upload_stream) and the content dedup
  (create_job_from_upload) count under a per-tenant advisory lock (`_TENANT_LOCK`), held to commit;
- a transition locks the job row (`FOR UPDATE`) before it checks the state and the claim.

Live events across replicas: every transaction that appends events also sends
`pg_notify('mocap_job_events', job_id)` (delivered at commit); each store listens on a dedicated
connection and calls `on_event(job_id)` for every notification, its own included, besides calling
it itself after its own commits as SQLite does. A lost listener connection is re-made in the
background with backoff; notifications sent meanwhile are lost, which only delays watchers (they
also poll).

Schema: `PG_MIGRATIONS`, the same versions as `SQLITE_MIGRATIONS`, applied at open in one
transaction under a fixed advisory lock (`_MIGRATION_LOCK`), so replicas starting together apply
each migration once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import asyncpg

from gateway.jobs import (
    ALLOWED_FROM,
    RUNNING,
    JobError,
    JobRecord,
    UploadRecord,
    now_us,
    options_key,
)
from gateway.store import (
    JOB_TAKEOVERS,
    JOBS_CREATED,
    STATE_NAMES,
    RequestIdTaken,
    TooManyActive,
    count_transition,
    event_body,
    event_from_row,
    job_from_row,
    resumed_event,
    state_event,
    transitioned,
    upload_from_row,
)
from mocap.v1 import common_pb2, gateway_pb2
from mocap_common.logs import get_logger

log = get_logger(__name__)

EVENTS_CHANNEL = "mocap_job_events"
# pg_advisory_xact_lock keys. The migration key is fixed (any bigint no other application uses);
# a tenant's key is hashed from its name, prefixed so it cannot collide with other users of
# advisory locks that hash plain names.
_MIGRATION_LOCK = 0x6D6F636170_01  # "mocap" + 1
_TENANT_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('mocap-tenant:' || $1::text, 0))"

# The listener: how often its connection is checked (a dead TCP peer is otherwise noticed only
# when the kernel gives up), and the reconnect backoff.
_LISTENER_PING_S = 10.0
_LISTENER_PING_TIMEOUT_S = 5.0
_LISTENER_CONNECT_TIMEOUT_S = 10.0
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 10.0

# Each migration runs once, in order, all of them in one transaction; never edit one that was
# released, add the next. Same versions and final schema as SQLITE_MIGRATIONS, in PostgreSQL types
# (BIGINT for times, sizes and counters, BYTEA for serialized messages). Unlike SQLite's version
# 1, no IF NOT EXISTS: there never was a PostgreSQL schema made without migrations.
PG_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    stage INTEGER NOT NULL DEFAULT 0,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    display_filename TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    options BYTEA NOT NULL,
    options_key TEXT NOT NULL,
    input_name TEXT NOT NULL,
    video BYTEA NOT NULL,
    error_reason TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    error_stage INTEGER NOT NULL DEFAULT 0,
    quality BYTEA,
    create_us BIGINT NOT NULL,
    update_us BIGINT NOT NULL,
    start_us BIGINT NOT NULL DEFAULT 0,
    end_us BIGINT NOT NULL DEFAULT 0,
    expire_us BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, create_us DESC, job_id DESC);
CREATE INDEX jobs_by_content ON jobs (tenant, sha256, options_key);
CREATE INDEX jobs_by_state ON jobs (state, create_us);
CREATE FUNCTION jobs_terminal_is_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job is in a terminal state' USING ERRCODE = 'check_violation';
END;
$$;
CREATE TRIGGER jobs_terminal_is_final BEFORE UPDATE OF state ON jobs FOR EACH ROW
WHEN (OLD.state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND NEW.state <> OLD.state)
EXECUTE FUNCTION jobs_terminal_is_final();
CREATE TABLE events (
    job_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE artifacts (
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (job_id, position)
);
CREATE TABLE uploads (
    upload_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    display_filename TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    declared_sha256 TEXT NOT NULL,
    options BYTEA NOT NULL,
    committed_bytes BIGINT NOT NULL,
    create_us BIGINT NOT NULL,
    expire_us BIGINT NOT NULL,
    job_id TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX uploads_by_request ON uploads (tenant, request_id) WHERE request_id <> '';
CREATE INDEX uploads_by_job ON uploads (job_id);
"""),
    # Durable execution: per-job event counter, claims, checkpoints; upload stream leases.
    (2, """
ALTER TABLE jobs ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0;
UPDATE jobs SET last_seq = (SELECT COALESCE(MAX(seq), 0) FROM events WHERE events.job_id = jobs.job_id);
ALTER TABLE jobs ADD COLUMN claim_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN claim_token TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN claim_expire_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN claims BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN completed_stage INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN checkpoint BYTEA NOT NULL DEFAULT ''::bytea;
ALTER TABLE uploads ADD COLUMN stream_owner TEXT NOT NULL DEFAULT '';
ALTER TABLE uploads ADD COLUMN stream_expire_us BIGINT NOT NULL DEFAULT 0;
"""),
)

_ACTIVE_JOBS = "SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND state IN ('QUEUED', 'RUNNING')"
_ACTIVE_UPLOADS = "SELECT COUNT(*) FROM uploads WHERE tenant = $1 AND job_id = '' AND stream_expire_us > $2"
_COUNT_ACTIVE = f"SELECT ({_ACTIVE_JOBS}) + ({_ACTIVE_UPLOADS})"


def _rowcount(status: str) -> int:
    """The row count of a command tag ("UPDATE 1", "DELETE 0", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[1])


class PostgresJobStore:
    """`JobStore` on PostgreSQL; make one with `await PostgresJobStore.open(url, ...)`.

    `on_event(job_id)` is called after every commit of this store that added events to a job, and
    for every event notification from any store on the same database (this one included)."""

    def __init__(self, url: str, pool: asyncpg.Pool, *, job_retention_s: float,
                 on_event: Callable[[str], None]) -> None:
        self._url = url
        self._pool = pool
        self._retention_us = int(job_retention_s * 1_000_000)
        self._on_event = on_event
        self._listener: asyncpg.Connection | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, job_retention_s: float, on_event: Callable[[str], None] = lambda _: None,
                   pool_min: int = 1, pool_max: int = 10) -> "PostgresJobStore":
        """Connects (a pool of `pool_min`..`pool_max` connections), applies the migrations and
        starts listening for event notifications."""
        pool = await asyncpg.create_pool(url, min_size=pool_min, max_size=pool_max)
        store = cls(url, pool, job_retention_s=job_retention_s, on_event=on_event)
        try:
            await store._migrate()
            # The first listener connection is made here, so a failure shows at open and no
            # notification after open() returned is missed.
            first = store._listener = await store._listen_connection()
            store._listener_task = asyncio.create_task(store._listen(first), name="pg-job-events-listener")
        except BaseException:
            await pool.close()
            raise
        return store

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations"
                               " (version INTEGER PRIMARY KEY, applied_us BIGINT NOT NULL)")
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, sql in PG_MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, applied_us) VALUES ($1, $2)",
                                   version, now_us())
                log.info("job store migrated", schema_version=version)

    async def schema_version(self) -> int:
        async with self._pool.acquire() as conn:
            return await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener_task is not None:
            self._listener_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener_task
        if self._listener is not None:  # the task was cancelled before it began (it closes its own)
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=_LISTENER_PING_TIMEOUT_S)
            self._listener.terminate()
            self._listener = None
        await self._pool.close()

    # Event notifications -------------------------------------------------------------------

    async def _listen_connection(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self._url, timeout=_LISTENER_CONNECT_TIMEOUT_S)
        try:
            await conn.add_listener(EVENTS_CHANNEL, self._notified)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _notified(self, _conn: object, _pid: int, _channel: str, job_id: str) -> None:
        try:
            self._on_event(job_id)
        except Exception:  # a failing watcher must not stop the listener
            log.exception("job event callback failed", job=job_id)

    async def _listen(self, conn: asyncpg.Connection | None) -> None:
        """Keeps a listening connection: checks it now and then, makes a new one when it is lost
        (retrying with backoff, reset once a connection has lasted a while)."""
        backoff = _BACKOFF_FIRST_S
        while True:
            if conn is None:
                try:
                    conn = await self._listen_connection()
                except Exception as exc:
                    log.warning("job event listener cannot reconnect; retrying", error=repr(exc), retry_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
                    continue
                log.info("job event listener reconnected")
            self._listener = conn
            since = asyncio.get_running_loop().time()
            try:
                await self._watch(conn)
                log.warning("job event listener connection closed; reconnecting "
                            "(events meanwhile reach watchers by polling)", retry_s=backoff)
            except Exception as exc:  # whatever broke it, the listener goes on
                log.warning("job event listener connection lost; reconnecting "
                            "(events meanwhile reach watchers by polling)", error=repr(exc), retry_s=backoff)
            finally:  # cancelled (close()) too
                self._listener = None
                conn.terminate()
                conn = None
            if asyncio.get_running_loop().time() - since > _BACKOFF_MAX_S:
                backoff = _BACKOFF_FIRST_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    @staticmethod
    async def _watch(conn: asyncpg.Connection) -> None:
        """Returns (or raises) when `conn` is lost: closed by the server, or not answering."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not conn.is_closed():
            try:
                await asyncio.wait_for(lost.wait(), _LISTENER_PING_S)
                return
            except asyncio.TimeoutError:
                pass
            await conn.fetchval("SELECT 1", timeout=_LISTENER_PING_TIMEOUT_S)

    # Transactions --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        """A write transaction. READ COMMITTED, whatever the server's default: a statement after
        an advisory lock must see what the lock's previous holder committed."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            yield conn

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A read of several statements from one snapshot (jobs and their artifacts)."""
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    # Uploads -------------------------------------------------------------------------------

    async def insert_upload(self, upload: UploadRecord, max_active: int = 0) -> None:
        try:
            async with self._tx() as conn:
                await self._check_active(conn, upload.tenant, max_active)
                await conn.execute(
                    "INSERT INTO uploads (upload_id, tenant, request_id, display_filename, size_bytes, declared_sha256,"
                    " options, committed_bytes, create_us, expire_us, job_id, stream_owner, stream_expire_us)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
                    upload.upload_id, upload.tenant, upload.request_id, upload.display_filename, upload.size_bytes,
                    upload.declared_sha256, upload.options.SerializeToString(deterministic=True), upload.committed_bytes,
                    upload.create_us, upload.expire_us, upload.job_id, upload.stream_owner, upload.stream_expire_us,
                )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "uploads_by_request":
                raise RequestIdTaken(upload.request_id) from None
            raise

    async def claim_upload_stream(self, upload_id: str, owner: str, expire_us: int, max_active: int = 0) -> bool:
        async with self._tx() as conn:
            # The tenant lock before the row lock, as create_job_from_upload takes them (no deadlock).
            tenant = await conn.fetchval("SELECT tenant FROM uploads WHERE upload_id = $1", upload_id)
            if tenant is None:
                return False
            if max_active > 0:
                await conn.execute(_TENANT_LOCK, tenant)
            # FOR UPDATE: of two replicas resuming it at once, the second re-reads the row after
            # the first committed, finds the lease held, and gets False.
            row = await conn.fetchrow("SELECT tenant FROM uploads WHERE upload_id = $1 AND job_id = ''"
                                      " AND stream_expire_us <= $2 FOR UPDATE", upload_id, now_us())
            if row is None:
                return False
            await self._check_active(conn, row["tenant"], max_active, locked=True)
            await conn.execute("UPDATE uploads SET stream_owner = $1, stream_expire_us = $2 WHERE upload_id = $3",
                               owner, expire_us, upload_id)
            return True

    async def renew_upload_streams(self, owner: str, upload_ids: list[str], expire_us: int) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE uploads SET stream_expire_us = $1 WHERE upload_id = ANY($2::text[])"
                               " AND stream_owner = $3", expire_us, list(upload_ids), owner)

    async def release_upload_stream(self, upload_id: str, owner: str) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE uploads SET stream_owner = '', stream_expire_us = 0"
                               " WHERE upload_id = $1 AND stream_owner = $2", upload_id, owner)

    async def get_upload(self, upload_id: str) -> UploadRecord | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM uploads WHERE upload_id = $1", upload_id)
        return upload_from_row(row) if row else None

    async def find_upload(self, tenant: str, request_id: str) -> UploadRecord | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM uploads WHERE tenant = $1 AND request_id = $2", tenant, request_id)
        return upload_from_row(row) if row else None

    async def uploads(self) -> list[UploadRecord]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM uploads ORDER BY create_us, upload_id")
        return [upload_from_row(r) for r in rows]

    async def set_upload_committed(self, upload_id: str, committed_bytes: int, expire_us: int) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE uploads SET committed_bytes = $1, expire_us = $2 WHERE upload_id = $3"
                               " AND job_id = ''", committed_bytes, expire_us, upload_id)

    async def delete_upload(self, upload_id: str) -> None:
        async with self._tx() as conn:
            await conn.execute("DELETE FROM uploads WHERE upload_id = $1", upload_id)

    async def create_job_from_upload(self, upload_id: str, job: JobRecord) -> JobRecord:
        async with self._tx() as conn:
            # Under the tenant lock, a job of the same content made by another replica meanwhile
            # is either committed (and found here) or not yet begun its check.
            await conn.execute(_TENANT_LOCK, job.tenant)
            row = await conn.fetchrow(
                "SELECT * FROM jobs WHERE tenant = $1 AND sha256 = $2 AND options_key = $3"
                " AND state IN ('QUEUED', 'RUNNING') ORDER BY create_us DESC LIMIT 1",
                job.tenant, job.sha256, options_key(job.options))
            if row is not None:
                await self._finish_upload(conn, upload_id, row["job_id"])
                return (await self._jobs(conn, [row]))[0]
            await conn.execute(
                "INSERT INTO jobs (job_id, tenant, state, display_filename, request_id, size_bytes, sha256, options,"
                " options_key, input_name, video, create_us, update_us) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
                job.job_id, job.tenant, STATE_NAMES[job.state], job.display_filename, job.request_id, job.size_bytes,
                job.sha256, job.options.SerializeToString(deterministic=True), options_key(job.options),
                job.input_name, job.video.SerializeToString(), job.create_us, job.create_us,
            )
            await self._finish_upload(conn, upload_id, job.job_id)
            await self._append(conn, job.job_id, state_event(job), job.create_us)
        JOBS_CREATED.inc()
        count_transition(job.state)
        self._on_event(job.job_id)
        return job.with_changes(update_us=job.create_us)

    async def complete_upload_as(self, upload_id: str, existing_job_id: str) -> None:
        async with self._tx() as conn:
            await self._finish_upload(conn, upload_id, existing_job_id)

    @staticmethod
    async def _finish_upload(conn: asyncpg.Connection, upload_id: str, job_id: str) -> None:
        # Only an upload with a request_id is answered again later; the others are forgotten.
        await conn.execute("UPDATE uploads SET job_id = $1, committed_bytes = size_bytes, stream_owner = '',"
                           " stream_expire_us = 0 WHERE upload_id = $2 AND request_id <> ''", job_id, upload_id)
        await conn.execute("DELETE FROM uploads WHERE upload_id = $1 AND request_id = ''", upload_id)

    @staticmethod
    async def _check_active(conn: asyncpg.Connection, tenant: str, max_active: int, *, locked: bool = False) -> None:
        """TooManyActive when the tenant is at `max_active` (> 0). Counts under the tenant lock
        (taken here unless `locked`), so replicas admitting at once cannot overshoot together."""
        if max_active > 0:
            if not locked:
                await conn.execute(_TENANT_LOCK, tenant)
            active = await conn.fetchval(_COUNT_ACTIVE, tenant, now_us())
            if active >= max_active:
                raise TooManyActive(active)

    # Jobs ----------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        async with self._snapshot() as conn:
            row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
            return (await self._jobs(conn, [row]))[0] if row else None

    async def find_duplicate(self, tenant: str, sha256: str, options_key: str) -> JobRecord | None:
        async with self._snapshot() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM jobs WHERE tenant = $1 AND sha256 = $2 AND options_key = $3"
                " AND state IN ('QUEUED', 'RUNNING', 'SUCCEEDED') ORDER BY create_us DESC LIMIT 1",
                tenant, sha256, options_key)
            return (await self._jobs(conn, [row]))[0] if row else None

    async def count_active(self, tenant: str) -> int:
        async with self._pool.acquire() as conn:
            return await conn.fetchval(_COUNT_ACTIVE, tenant, now_us())

    async def list_jobs(self, tenant: str, state: int, limit: int, after: tuple[int, str] | None) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE tenant = $1", [tenant]
        if state:
            args.append(STATE_NAMES[state])
            sql += f" AND state = ${len(args)}"
        if after is not None:
            args += [after[0], after[1]]
            sql += f" AND (create_us < ${len(args) - 1} OR (create_us = ${len(args) - 1} AND job_id < ${len(args)}))"
        args.append(limit)
        sql += f" ORDER BY create_us DESC, job_id DESC LIMIT ${len(args)}"
        async with self._snapshot() as conn:
            return await self._jobs(conn, await conn.fetch(sql, *args))

    async def jobs_in_state(self, state: int) -> list[JobRecord]:
        async with self._snapshot() as conn:
            rows = await conn.fetch("SELECT * FROM jobs WHERE state = $1 ORDER BY create_us, job_id", STATE_NAMES[state])
            return await self._jobs(conn, rows)

    async def expired_jobs(self, now: int) -> list[JobRecord]:
        async with self._snapshot() as conn:
            rows = await conn.fetch("SELECT * FROM jobs WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"
                                    " AND expire_us > 0 AND expire_us <= $1", now)
            return await self._jobs(conn, rows)

    async def claim_job(self, owner: str, token: str, expire_us: int) -> JobRecord | None:
        now = now_us()
        async with self._tx() as conn:
            # SKIP LOCKED: a job another replica is claiming (or writing) right now is passed
            # over, and a row that stopped qualifying meanwhile is re-checked and skipped too.
            row = await conn.fetchrow(
                "SELECT job_id, state FROM jobs WHERE state = 'QUEUED' OR (state = 'RUNNING' AND claim_expire_us <= $1)"
                " ORDER BY (state = 'RUNNING') DESC, create_us, job_id LIMIT 1 FOR UPDATE SKIP LOCKED", now)
            if row is None:
                return None
            job_id, takeover = row["job_id"], row["state"] == "RUNNING"
            if takeover:
                updated = await conn.fetchrow(
                    "UPDATE jobs SET claim_owner = $1, claim_token = $2, claim_expire_us = $3, claims = claims + 1,"
                    " update_us = $4 WHERE job_id = $5 RETURNING *", owner, token, expire_us, now, job_id)
                job = (await self._jobs(conn, [updated]))[0]
                await self._append(conn, job_id, resumed_event(job), now)
            else:
                updated = await conn.fetchrow(
                    "UPDATE jobs SET state = 'RUNNING', claim_owner = $1, claim_token = $2, claim_expire_us = $3,"
                    " claims = claims + 1, update_us = $4, start_us = $4 WHERE job_id = $5 RETURNING *",
                    owner, token, expire_us, now, job_id)
                job = (await self._jobs(conn, [updated]))[0]
                await self._append(conn, job_id, state_event(job), now)
        if takeover:
            JOB_TAKEOVERS.inc()
        else:
            count_transition(RUNNING)
        self._on_event(job_id)
        return job

    async def renew_claims(self, owner: str, tokens: Mapping[str, str], expire_us: int) -> set[str]:
        if not tokens:
            return set()
        ids = sorted(tokens)
        async with self._tx() as conn:
            rows = await conn.fetch(
                "UPDATE jobs SET claim_expire_us = $1 FROM unnest($2::text[], $3::text[]) AS held (job_id, token)"
                " WHERE jobs.job_id = held.job_id AND jobs.state = 'RUNNING' AND jobs.claim_owner = $4"
                " AND jobs.claim_token = held.token RETURNING jobs.job_id",
                expire_us, ids, [tokens[i] for i in ids], owner)
        return {row["job_id"] for row in rows}

    async def release_claim(self, job_id: str, token: str) -> None:
        async with self._tx() as conn:
            await conn.execute("UPDATE jobs SET claim_expire_us = 0 WHERE job_id = $1 AND state = 'RUNNING'"
                               " AND claim_token = $2", job_id, token)

    async def record_checkpoint(self, job_id: str, token: str, stage: int, checkpoint: bytes) -> bool:
        async with self._tx() as conn:
            status = await conn.execute(
                "UPDATE jobs SET completed_stage = $1, checkpoint = $2 WHERE job_id = $3 AND state = 'RUNNING'"
                " AND claim_token = $4", stage, checkpoint, job_id, token)
            return _rowcount(status) == 1

    async def transition(self, job_id: str, state: int, *, error: JobError | None = None,
                         artifacts: tuple[common_pb2.Artifact, ...] | None = None,
                         quality: common_pb2.QualityReport | None = None, message: str = "",
                         only_from: frozenset[int] | None = None, claim_token: str | None = None) -> JobRecord | None:
        now = now_us()
        async with self._tx() as conn:
            allowed_from = ALLOWED_FROM[state] if only_from is None else ALLOWED_FROM[state] & only_from
            # FOR UPDATE: the state and claim checked below stay so until commit.
            row = await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
            if row is None:
                return None
            current = (await self._jobs(conn, [row]))[0]
            if current.state not in allowed_from:
                return None
            if claim_token is not None and current.claim_token != claim_token:
                return None
            new = transitioned(current, state, now, self._retention_us, error=error, artifacts=artifacts, quality=quality)
            status = await conn.execute(
                "UPDATE jobs SET state = $1, stage = $2, progress = $3, error_reason = $4, error_message = $5,"
                " error_stage = $6, quality = $7, update_us = $8, start_us = $9, end_us = $10, expire_us = $11,"
                " claim_owner = $12, claim_token = $13, claim_expire_us = $14"
                " WHERE job_id = $15 AND state = ANY($16::text[])",
                STATE_NAMES[state], new.stage, new.progress, new.error.reason if new.error else "",
                new.error.message if new.error else "", new.error.stage if new.error else 0,
                new.quality.SerializeToString() if new.quality is not None else None,
                new.update_us, new.start_us, new.end_us, new.expire_us, new.claim_owner, new.claim_token,
                new.claim_expire_us, job_id, [STATE_NAMES[s] for s in allowed_from],
            )
            if _rowcount(status) != 1:
                return None
            if new.artifacts:
                await conn.executemany("INSERT INTO artifacts (job_id, position, body) VALUES ($1, $2, $3)",
                                       [(job_id, position, artifact.SerializeToString())
                                        for position, artifact in enumerate(new.artifacts)])
            await self._append(conn, job_id, state_event(new, message), now)
        count_transition(state)
        self._on_event(job_id)
        return new

    async def record_stage_event(self, job_id: str, event: gateway_pb2.JobEvent, progress: float,
                                 claim_token: str | None = None) -> bool:
        now = now_us()
        sql = "UPDATE jobs SET stage = $1, progress = $2, update_us = $3 WHERE job_id = $4 AND state = 'RUNNING'"
        args: list[Any] = [event.stage, progress, now, job_id]
        if claim_token is not None:
            sql += " AND claim_token = $5"
            args.append(claim_token)
        async with self._tx() as conn:
            if _rowcount(await conn.execute(sql, *args)) != 1:
                return False
            event.state = RUNNING
            await self._append(conn, job_id, event, now)
        self._on_event(job_id)
        return True

    async def events_after(self, job_id: str, after_seq: int, limit: int) -> list[gateway_pb2.JobEvent]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT seq, time_us, body FROM events WHERE job_id = $1 AND seq > $2"
                                    " ORDER BY seq LIMIT $3", job_id, after_seq, limit)
        return [event_from_row(row["seq"], row["time_us"], row["body"]) for row in rows]

    async def delete_job(self, job_id: str) -> None:
        async with self._tx() as conn:
            # The job row first: an append (which locks it too) either committed before, and its
            # event is deleted here, or comes after and finds no job.
            await conn.execute("SELECT 1 FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
            await conn.execute("DELETE FROM events WHERE job_id = $1", job_id)
            await conn.execute("DELETE FROM artifacts WHERE job_id = $1", job_id)
            await conn.execute("DELETE FROM uploads WHERE job_id = $1", job_id)
            await conn.execute("DELETE FROM jobs WHERE job_id = $1", job_id)

    # Helpers -------------------------------------------------------------------------------

    @staticmethod
    async def _append(conn: asyncpg.Connection, job_id: str, event: gateway_pb2.JobEvent, time_us: int) -> int:
        # The UPDATE locks the job row until commit: concurrent appends (any replica) queue up,
        # each numbered after the previous one committed.
        seq = await conn.fetchval("UPDATE jobs SET last_seq = last_seq + 1 WHERE job_id = $1 RETURNING last_seq", job_id)
        await conn.execute("INSERT INTO events (job_id, seq, time_us, body) VALUES ($1, $2, $3, $4)",
                           job_id, seq, time_us, event_body(event))
        await conn.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, job_id)  # delivered at commit
        return seq

    @staticmethod
    async def _jobs(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> list[JobRecord]:
        if not rows:
            return []
        artifacts: dict[str, list[common_pb2.Artifact]] = {}
        for a in await conn.fetch("SELECT job_id, body FROM artifacts WHERE job_id = ANY($1::text[])"
                                  " ORDER BY job_id, position", [r["job_id"] for r in rows]):
            artifacts.setdefault(a["job_id"], []).append(common_pb2.Artifact.FromString(a["body"]))
        return [job_from_row(r, tuple(artifacts.get(r["job_id"], ()))) for r in rows]


__all__ = ["EVENTS_CHANNEL", "PG_MIGRATIONS", "PostgresJobStore"]
