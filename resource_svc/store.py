"""The lease table on disk: an append-only event log that also keeps the latest row per lease.

Every state change of the broker is a `LeaseEvent` carrying the lease as it was after the change,
so persisting a change is one call: `LeaseStore.append(events)` writes the event, upserts the
lease row and, for grants, the slot's last fencing token — in one transaction. On startup
`load()` returns what the broker needs to carry on: active leases, the newest ended ones, the
last token of every slot and the last event seq.

`GroupCommitWriter` is the broker's only path to the store: changes are appended in memory order
and committed many per transaction by one writer thread, so an fsync is shared by every change
that arrived while the previous one ran (group commit). A caller acknowledges its change only
after `barrier()` resolves, i.e. after the transaction holding it is durable.

SQLite runs in WAL mode with `synchronous=FULL` by default: each commit fsyncs the WAL, so an
acknowledged grant survives power loss too — fencing tokens must never be handed out twice,
even after the machine crashes. Group commit makes that affordable (one fsync per batch).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import Histogram

from mocap_common.logs import get_logger
from resource_svc.leases import (
    EventType,
    GpuProcess,
    Holder,
    Lease,
    LeaseEvent,
    LeaseState,
    SlotKind,
    StoreFailed,
)

log = get_logger(__name__)

COMMIT_SECONDS = Histogram(
    "mocap_resource_store_commit_seconds",
    "Time to write and commit one batch of lease changes to SQLite, seconds.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)
BATCH_EVENTS = Histogram(
    "mocap_resource_store_batch_events",
    "Lease changes committed per SQLite transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)

SlotKey = tuple[str, SlotKind, int]  # (device key, kind, slot)


@dataclass
class StoredState:
    """What `load()` returns: enough to restart the broker where it stopped."""

    active: list[Lease] = field(default_factory=list)
    ended: list[Lease] = field(default_factory=list)  # oldest end first
    tokens: dict[SlotKey, int] = field(default_factory=dict)
    last_seq: int = 0


class LeaseStore(Protocol):
    """Durable lease table. Called from one writer thread at a time, except `read_events`."""

    def load(self) -> StoredState:
        """Everything the broker restores on startup."""
        ...

    def append(self, events: Sequence[LeaseEvent]) -> None:
        """Persists events (and the lease rows and tokens they carry) in one durable transaction."""
        ...

    def read_events(self, after_seq: int, limit: int) -> list[LeaseEvent]:
        """Committed events with seq > after_seq, oldest first; safe from any thread."""
        ...

    def close(self) -> None:
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    device TEXT NOT NULL,
    device_key TEXT NOT NULL,
    device_uuid TEXT NOT NULL,
    device_index INTEGER NOT NULL,
    kind TEXT NOT NULL,
    slot INTEGER NOT NULL,
    fencing_token INTEGER NOT NULL,
    holder_service TEXT NOT NULL,
    holder_job TEXT NOT NULL,
    holder_pid INTEGER NOT NULL,
    holder_host TEXT NOT NULL,
    ttl_s REAL NOT NULL,
    priority INTEGER NOT NULL,
    grant_time REAL NOT NULL,
    expire_time REAL NOT NULL,
    renew_time REAL NOT NULL,
    request_id TEXT NOT NULL,
    grant_seq INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    end_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS leases_by_state_end ON leases(state, end_seq);
CREATE TABLE IF NOT EXISTS slot_tokens (
    device_key TEXT NOT NULL,
    kind TEXT NOT NULL,
    slot INTEGER NOT NULL,
    last_token INTEGER NOT NULL,
    PRIMARY KEY (device_key, kind, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    device TEXT NOT NULL,
    body TEXT NOT NULL
);
"""

_LEASE_COLUMNS = (
    "name", "state", "device", "device_key", "device_uuid", "device_index", "kind", "slot", "fencing_token",
    "holder_service", "holder_job", "holder_pid", "holder_host", "ttl_s", "priority", "grant_time",
    "expire_time", "renew_time", "request_id", "grant_seq", "fingerprint", "end_seq",
)
# After its grant only a lease's state and times change: update those in place (cheaper than
# REPLACE, which deletes and re-inserts the row and its index entries).
_UPSERT_LEASE = (f"INSERT INTO leases ({', '.join(_LEASE_COLUMNS)}) VALUES ({', '.join('?' * len(_LEASE_COLUMNS))}) "
                 "ON CONFLICT (name) DO UPDATE SET state = excluded.state, device = excluded.device, "
                 "expire_time = excluded.expire_time, renew_time = excluded.renew_time, end_seq = excluded.end_seq")
_UPSERT_TOKEN = ("INSERT INTO slot_tokens (device_key, kind, slot, last_token) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (device_key, kind, slot) DO UPDATE SET last_token = MAX(last_token, excluded.last_token)")
_INSERT_EVENT = "INSERT INTO events (seq, time, type, device, body) VALUES (?, ?, ?, ?, ?)"
_ENDING_EVENTS = (EventType.RELEASED, EventType.RECLAIMED)


class SqliteLeaseStore:
    """`LeaseStore` in one SQLite file (WAL). Keeps the newest `events_kept` events and the newest
    `ended_kept` ended leases; older ones are pruned every `prune_every` events."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", events_kept: int = 100_000,
                 ended_kept: int = 10_000, prune_every: int = 1_000) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous.upper()
        self._events_kept = max(1, events_kept)
        self._ended_kept = max(0, ended_kept)
        self._prune_every = max(1, prune_every)
        self._since_prune = 0
        self._last_seq = 0
        # The writer connection moves between the loading thread and the writer thread, never used
        # by two at once; readers get their own connection per thread.
        self._conn = self._connect()
        self._conn.executescript(_SCHEMA)
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    def load(self) -> StoredState:
        state = StoredState()
        rows = self._conn.execute(f"SELECT {', '.join(_LEASE_COLUMNS)} FROM leases WHERE state = ?",
                                  (LeaseState.ACTIVE.value,)).fetchall()
        state.active = [_row_to_lease(r) for r in rows]
        rows = self._conn.execute(
            f"SELECT {', '.join(_LEASE_COLUMNS)} FROM leases WHERE state != ? ORDER BY end_seq DESC LIMIT ?",
            (LeaseState.ACTIVE.value, self._ended_kept)).fetchall()
        state.ended = [_row_to_lease(r) for r in reversed(rows)]
        for key, kind, slot, token in self._conn.execute("SELECT device_key, kind, slot, last_token FROM slot_tokens"):
            state.tokens[(key, SlotKind(kind), slot)] = token
        state.last_seq = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        self._last_seq = state.last_seq
        return state

    def append(self, events: Sequence[LeaseEvent]) -> None:
        if not events:
            return
        lease_rows, token_rows, event_rows = [], [], []
        for event in events:
            lease = event.lease
            if lease is not None:
                row = _lease_to_row(lease, event.seq if event.type in _ENDING_EVENTS else 0)
                lease_rows.append(row)
                if event.type is EventType.GRANTED:
                    token_rows.append((lease.device_key, row[6], lease.slot, lease.fencing_token))
                body = _JSON.encode({"lease": row})
            elif event.process is not None:
                p = event.process
                body = _JSON.encode({"process": [p.pid, p.used_memory_bytes, p.unleased]})
            else:
                body = "{}"
            event_rows.append((event.seq, event.time, _VALUE[event.type], event.device, body))
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if lease_rows:
                conn.executemany(_UPSERT_LEASE, lease_rows)
            if token_rows:
                conn.executemany(_UPSERT_TOKEN, token_rows)
            conn.executemany(_INSERT_EVENT, event_rows)
            self._last_seq = events[-1].seq
            self._since_prune += len(events)
            if self._since_prune >= self._prune_every:
                self._since_prune = 0
                self._prune()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _prune(self) -> None:
        self._conn.execute("DELETE FROM events WHERE seq <= ?", (self._last_seq - self._events_kept,))
        row = self._conn.execute(
            "SELECT end_seq FROM leases WHERE state != ? ORDER BY end_seq DESC LIMIT 1 OFFSET ?",
            (LeaseState.ACTIVE.value, self._ended_kept)).fetchone()
        if row is not None:
            self._conn.execute("DELETE FROM leases WHERE state != ? AND end_seq <= ?",
                               (LeaseState.ACTIVE.value, row[0]))

    def read_events(self, after_seq: int, limit: int) -> list[LeaseEvent]:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._connect()
            self._readers.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        rows = conn.execute("SELECT seq, time, type, device, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                            (after_seq, limit)).fetchall()
        return [_row_to_event(r) for r in rows]

    def close(self) -> None:
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._conn.close()


class GroupCommitWriter:
    """Commits lease changes in the order they were made, batching whatever queued up while the
    previous transaction ran. `on_committed` sees each batch after it is durable (for watchers)."""

    def __init__(self, store: LeaseStore, on_committed: Callable[[list[LeaseEvent]], None]) -> None:
        self._store = store
        self._on_committed = on_committed
        self._pending: list[LeaseEvent] = []
        self._pending_done: asyncio.Future[None] | None = None
        self._last_done: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease-store")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lease-store-writer")

    def append(self, event: LeaseEvent) -> None:
        """Queues one change; it is durable once the future from a later `barrier()` resolves."""
        if self._closing:
            raise StoreFailed("the lease store is closed")
        self._pending.append(event)
        self._wake.set()

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves when every change appended so far is committed (shared: shield it)."""
        if self._pending:
            if self._pending_done is None:
                self._pending_done = asyncio.get_running_loop().create_future()
            return self._pending_done
        if self._last_done is None:
            self._last_done = asyncio.get_running_loop().create_future()
            self._last_done.set_result(None)
        return self._last_done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            done = self._pending_done or loop.create_future()
            self._pending_done = None
            self._last_done = done
            started = time.perf_counter()
            try:
                await loop.run_in_executor(self._executor, self._store.append, batch)
            except Exception as exc:  # noqa: BLE001 - the callers waiting on this batch get it
                log.error("lease store commit failed", error=str(exc), events=len(batch))
                done.set_exception(StoreFailed(f"the lease table could not be written: {exc}"))
                done.exception()  # retrieved here: callers that went away must not warn about it
                self._last_done = None  # later barriers cover later changes only
                continue
            COMMIT_SECONDS.observe(time.perf_counter() - started)
            BATCH_EVENTS.observe(len(batch))
            done.set_result(None)
            try:
                self._on_committed(batch)
            except Exception:  # noqa: BLE001 - watchers must never stop the writer
                log.exception("publishing committed lease events failed")

    async def close(self) -> None:
        """Commits what is queued, then stops the writer and closes the store."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)
        self._executor.shutdown(wait=True)


_JSON = json.JSONEncoder(separators=(",", ":"))
# Enum .value is a slow descriptor; the writer looks values up here instead.
_VALUE: dict[object, str] = {member: member.value for enum in (SlotKind, LeaseState, EventType) for member in enum}


def _lease_to_row(lease: Lease, end_seq: int) -> tuple[object, ...]:
    h = lease.holder
    return (lease.name, _VALUE[lease.state], lease.device, lease.device_key, lease.device_uuid, lease.device_index,
            _VALUE[lease.kind], lease.slot, lease.fencing_token, h.service, h.job, h.pid, h.host, lease.ttl_s,
            lease.priority, lease.grant_time, lease.expire_time, lease.renew_time, lease.request_id,
            lease.grant_seq, lease.fingerprint, end_seq)


def _row_to_lease(row: Sequence[object]) -> Lease:
    (name, state, device, device_key, device_uuid, device_index, kind, slot, token, h_service, h_job, h_pid,
     h_host, ttl_s, priority, grant_time, expire_time, renew_time, request_id, grant_seq, fingerprint, _end) = row
    return Lease(
        name=str(name), device=str(device), device_key=str(device_key), device_uuid=str(device_uuid),
        device_index=int(device_index), kind=SlotKind(kind), slot=int(slot), fencing_token=int(token),
        state=LeaseState(state), holder=Holder(str(h_service), str(h_job), int(h_pid), str(h_host)),
        ttl_s=float(ttl_s), priority=int(priority), grant_time=float(grant_time), expire_time=float(expire_time),
        renew_time=float(renew_time), request_id=str(request_id), grant_seq=int(grant_seq),
        fingerprint=str(fingerprint),
    )


def _row_to_event(row: Sequence[object]) -> LeaseEvent:
    seq, when, type_, device, body = row
    data = json.loads(str(body))
    lease = _row_to_lease(data["lease"]) if "lease" in data else None
    process = GpuProcess(*data["process"]) if "process" in data else None
    return LeaseEvent(seq=int(seq), time=float(when), type=EventType(type_), device=str(device),
                      lease=lease, process=process)
