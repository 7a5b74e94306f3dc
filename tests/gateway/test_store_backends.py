"""Both job stores keep the same contract (gateway.store.JobStore), run against each one: SQLite in
a temp dir, PostgreSQL on a real throwaway server (tests/pgserver.py). Then the PostgreSQL store
under concurrency from two store instances on one database, standing for two gateway replicas."""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobError, JobRecord, UploadRecord, \
    canonical_options, now_us
from gateway.store import JobStore, RequestIdTaken, SqliteJobStore, TooManyActive
from mocap.v1 import common_pb2, gateway_pb2
from tests.pgserver import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)

HOUR_US = 3_600_000_000
OPTIONS = canonical_options(common_pb2.JobOptions())
STARTED = gateway_pb2.JOB_EVENT_TYPE_STAGE_STARTED
PROGRESS = gateway_pb2.JOB_EVENT_TYPE_STAGE_PROGRESS
TRACK = common_pb2.JOB_STAGE_TRACK
SMOOTH = common_pb2.JOB_STAGE_SMOOTH


def _id(n: int, prefix: str = "a") -> str:
    """A well-formed job id (j- + 20 base32 characters) from a number."""
    digits = "abcdefghijklmnopqrstuvwxyz234567"
    body = ""
    for _ in range(19):
        body = digits[n % 32] + body
        n //= 32
    return "j-" + prefix + body


def _upload(upload_id: str, *, tenant: str = "t", request_id: str = "", sha256: str = "", create_us: int | None = None,
            stream_owner: str = "r1", stream_expire_us: int | None = None) -> UploadRecord:
    created = now_us() if create_us is None else create_us
    return UploadRecord(upload_id=upload_id, tenant=tenant, request_id=request_id, display_filename="x.mp4",
                        size_bytes=100, declared_sha256=sha256, options=OPTIONS, committed_bytes=0, create_us=created,
                        expire_us=created + HOUR_US, stream_owner=stream_owner,
                        stream_expire_us=now_us() + HOUR_US if stream_expire_us is None else stream_expire_us)


def _job(job_id: str, *, tenant: str = "t", sha256: str | None = None, create_us: int | None = None,
         request_id: str = "") -> JobRecord:
    return JobRecord(job_id=job_id, tenant=tenant, state=QUEUED, display_filename="x.mp4", size_bytes=100,
                     sha256=sha256 or job_id.ljust(64, "0")[:64], options=OPTIONS, input_name="input.mp4",
                     video=common_pb2.VideoInfo(width=640, height=480), create_us=now_us() if create_us is None else create_us,
                     request_id=request_id)


async def _make_job(store: JobStore, job_id: str, **kwargs: Any) -> JobRecord:
    job = _job(job_id, **kwargs)
    await store.insert_upload(_upload(job_id, tenant=job.tenant, request_id=job.request_id, sha256=job.sha256,
                                      create_us=job.create_us))
    made = await store.create_job_from_upload(job_id, job)
    assert made.job_id == job_id
    return made


def _stage_event(stage: int = TRACK, kind: int = PROGRESS, progress: float = 0.5) -> gateway_pb2.JobEvent:
    return gateway_pb2.JobEvent(type=kind, stage=stage, stage_progress=progress)


async def _schema_version(store: Any) -> int:
    return await store.schema_version()


# ---------------------------------------------------------------------------------------------
# Backends


@dataclass
class Backend:
    kind: str
    target: Any  # SQLite: the file's Path; PostgreSQL: the database URL
    opened: list[Any] = field(default_factory=list)

    async def open(self, on_event: Callable[[str], None] = lambda _: None, job_retention_s: float = 60) -> Any:
        if self.kind == "sqlite":
            store: Any = SqliteJobStore(self.target, job_retention_s=job_retention_s, on_event=on_event)
        else:
            from gateway.store_pg import PostgresJobStore

            store = await PostgresJobStore.open(self.target, job_retention_s=job_retention_s, on_event=on_event)
        self.opened.append(store)
        return store

    async def raw(self, sql: str) -> None:
        """One statement on a connection of its own, not through a store (plain SQL with no parameters)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as db:
                db.execute(sql)
        else:
            import asyncpg

            conn = await asyncpg.connect(self.target)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

    async def scalar(self, sql: str) -> Any:
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as db:
                return db.execute(sql).fetchone()[0]
        import asyncpg

        conn = await asyncpg.connect(self.target)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def close_all(self) -> None:
        for store in self.opened:
            await store.close()
        self.opened.clear()


@pytest.fixture(params=["sqlite", "postgres"])
def backend_target(request, tmp_path) -> tuple[str, Any]:
    if request.param == "sqlite":
        return "sqlite", tmp_path / "store.sqlite3"
    pytest.importorskip("asyncpg")
    return "postgres", request.getfixturevalue("postgres_url")


@pytest.fixture
async def backend(backend_target) -> AsyncIterator[Backend]:
    b = Backend(*backend_target)
    yield b
    await b.close_all()


@pytest.fixture
async def store(backend) -> Any:
    return await backend.open()


@pytest.fixture
async def pg(postgres_url) -> AsyncIterator[Backend]:  # noqa: F811  (the imported fixture)
    pytest.importorskip("asyncpg")
    b = Backend("postgres", postgres_url)
    yield b
    await b.close_all()


# ---------------------------------------------------------------------------------------------
# The contract, on both backends


async def test_migrations_applied_once_and_idempotent_at_reopen(backend, store):
    assert await _schema_version(store) == 2
    await _make_job(store, _id(1))
    await store.close()
    backend.opened.remove(store)
    again = await backend.open()
    assert await _schema_version(again) == 2
    assert await backend.scalar("SELECT COUNT(*) FROM schema_migrations") == 2
    assert (await again.get_job(_id(1))).state == QUEUED  # the data survived the reopen
    # Two stores opened at once on one database (two replicas starting together) both work.
    first, second = await asyncio.gather(backend.open(), backend.open())
    assert await _schema_version(first) == await _schema_version(second) == 2
    assert await backend.scalar("SELECT COUNT(*) FROM schema_migrations") == 2


async def test_upload_insert_find_commit_and_complete(store):
    upload = _upload(_id(1), request_id="req-1", sha256="ab" * 32)
    await store.insert_upload(upload)
    assert await store.get_upload(upload.upload_id) == upload
    assert await store.find_upload("t", "req-1") == upload
    assert await store.find_upload("other", "req-1") is None
    assert await store.get_upload(_id(99)) is None
    await store.set_upload_committed(upload.upload_id, 60, upload.expire_us + 5)
    got = await store.get_upload(upload.upload_id)
    assert (got.committed_bytes, got.expire_us) == (60, upload.expire_us + 5)

    job = await store.create_job_from_upload(upload.upload_id, _job(upload.upload_id, sha256="ab" * 32, request_id="req-1"))
    done = await store.find_upload("t", "req-1")
    assert done.complete and done.job_id == job.job_id and done.committed_bytes == done.size_bytes
    assert (done.stream_owner, done.stream_expire_us) == ("", 0)
    await store.set_upload_committed(upload.upload_id, 1, 1)  # a complete upload no longer changes
    assert (await store.get_upload(upload.upload_id)).committed_bytes == 100
    # (The record returned is the one given; the stored one has update_us = create_us.)
    assert await store.get_job(job.job_id) == job.with_changes(update_us=job.create_us)
    events = await store.events_after(job.job_id, 0, 10)
    assert [(e.seq, e.type, e.state) for e in events] == [(1, gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED, QUEUED)]
    assert events[0].job.name == f"jobs/{job.job_id}" and events[0].time.ToMicroseconds() == job.create_us

    # Without a request_id nothing can ask for it again: completing it forgets it.
    anonymous = _upload(_id(2))
    await store.insert_upload(anonymous)
    await store.complete_upload_as(anonymous.upload_id, job.job_id)
    assert await store.get_upload(anonymous.upload_id) is None
    named = _upload(_id(3), request_id="req-3")
    await store.insert_upload(named)
    await store.complete_upload_as(named.upload_id, job.job_id)
    assert (await store.get_upload(named.upload_id)).job_id == job.job_id
    assert [u.upload_id for u in await store.uploads()] == [upload.upload_id, named.upload_id]

    await store.delete_upload(named.upload_id)
    assert await store.get_upload(named.upload_id) is None


async def test_upload_stream_leases(store):
    now = now_us()
    upload = _upload(_id(1), stream_owner="r1", stream_expire_us=now + HOUR_US)
    await store.insert_upload(upload)
    assert not await store.claim_upload_stream(upload.upload_id, "r2", now + HOUR_US)  # r1 streams it
    await store.renew_upload_streams("r2", [upload.upload_id], now + 2 * HOUR_US)  # not r2's to renew
    assert (await store.get_upload(upload.upload_id)).stream_expire_us == now + HOUR_US
    await store.renew_upload_streams("r1", [upload.upload_id], now + 2 * HOUR_US)
    assert (await store.get_upload(upload.upload_id)).stream_expire_us == now + 2 * HOUR_US
    await store.release_upload_stream(upload.upload_id, "r2")
    assert (await store.get_upload(upload.upload_id)).stream_owner == "r1"
    await store.release_upload_stream(upload.upload_id, "r1")
    assert await store.claim_upload_stream(upload.upload_id, "r2", now + HOUR_US)
    got = await store.get_upload(upload.upload_id)
    assert (got.stream_owner, got.stream_expire_us) == ("r2", now + HOUR_US)
    assert not await store.claim_upload_stream(_id(9), "r2", now + HOUR_US)  # no such upload


async def test_request_id_taken(store):
    await store.insert_upload(_upload(_id(1), request_id="req"))
    with pytest.raises(RequestIdTaken):
        await store.insert_upload(_upload(_id(2), request_id="req"))
    await store.insert_upload(_upload(_id(3), request_id="req", tenant="other"))  # per tenant
    await store.insert_upload(_upload(_id(4)))
    await store.insert_upload(_upload(_id(5)))  # no request_id: never taken
    with pytest.raises(Exception) as raised:  # the same upload id twice is no request_id matter
        await store.insert_upload(_upload(_id(1), request_id="req-other"))
    assert not isinstance(raised.value, RequestIdTaken)
    assert await store.get_upload(_id(2)) is None


async def test_too_many_active_counts_jobs_and_streaming_uploads(store):
    now = now_us()
    await _make_job(store, _id(1))  # an active job
    await store.insert_upload(_upload(_id(2)), max_active=3)  # streaming now
    await store.insert_upload(_upload(_id(3), stream_expire_us=now - 1), max_active=3)  # its stream lease lapsed
    await _make_job(store, _id(4), tenant="other")  # another tenant's
    assert await store.count_active("t") == 2
    await store.insert_upload(_upload(_id(5)), max_active=3)
    assert await store.count_active("t") == 3
    with pytest.raises(TooManyActive) as refused:
        await store.insert_upload(_upload(_id(6)), max_active=3)
    assert refused.value.active == 3
    assert await store.get_upload(_id(6)) is None
    await store.insert_upload(_upload(_id(7)))  # no limit given: none applied
    # Resuming the lapsed upload counts the others, not itself.
    with pytest.raises(TooManyActive):
        await store.claim_upload_stream(_id(3), "r2", now + HOUR_US, max_active=4)
    assert await store.claim_upload_stream(_id(3), "r2", now + HOUR_US, max_active=5)
    assert await store.count_active("t") == 5
    # A job that ended is no longer active.
    await store.transition(_id(1), CANCELLED)
    assert await store.count_active("t") == 4


async def test_create_job_from_upload_returns_the_active_duplicate(store):
    first = await _make_job(store, _id(1), sha256="cd" * 32)
    await store.insert_upload(_upload(_id(2), request_id="again", sha256="cd" * 32))
    got = await store.create_job_from_upload(_id(2), _job(_id(2), sha256="cd" * 32, request_id="again"))
    assert got.job_id == first.job_id and got == await store.get_job(first.job_id)
    assert await store.get_job(_id(2)) is None
    assert (await store.find_upload("t", "again")).job_id == first.job_id
    assert len(await store.events_after(first.job_id, 0, 10)) == 1  # nothing appended to it
    # Other options are other work.
    await store.insert_upload(_upload(_id(3), sha256="cd" * 32))
    other_options = _job(_id(3), sha256="cd" * 32).with_changes(
        options=canonical_options(common_pb2.JobOptions(max_persons=1)))
    assert (await store.create_job_from_upload(_id(3), other_options)).job_id == _id(3)
    # Once the first ended it is no duplicate any more.
    await store.transition(first.job_id, CANCELLED)
    await store.insert_upload(_upload(_id(4), sha256="cd" * 32))
    assert (await store.create_job_from_upload(_id(4), _job(_id(4), sha256="cd" * 32))).job_id == _id(4)
    assert (await store.find_duplicate("t", "cd" * 32, OPTIONS.SerializeToString(deterministic=True).hex())).job_id == _id(4)


async def test_claim_job_order_takeover_and_claims(store):
    base = now_us() - 10_000_000
    for n in range(3):
        await _make_job(store, _id(n), create_us=base + n)
    takeovers_before = REGISTRY.get_sample_value("mocap_gateway_job_takeovers_total") or 0.0
    now = now_us()
    first = await store.claim_job("r1", "tok-1", now - 1)  # a claim that has lapsed already
    assert (first.job_id, first.state, first.claims, first.claim_owner, first.claim_token) == (_id(0), RUNNING, 1, "r1", "tok-1")
    assert first.start_us and first == await store.get_job(_id(0))
    # The lapsed RUNNING job comes first, before the QUEUED ones (older ones included).
    await store.record_checkpoint(_id(0), "tok-1", TRACK, b"ckpt")
    taken = await store.claim_job("r2", "tok-2", now + HOUR_US)
    assert (taken.job_id, taken.state, taken.claims, taken.claim_owner, taken.claim_token) == (_id(0), RUNNING, 2, "r2", "tok-2")
    assert taken.start_us == first.start_us and taken.completed_stage == TRACK and taken.checkpoint == b"ckpt"
    events = await store.events_after(_id(0), 0, 10)
    assert [e.type for e in events] == [gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED, gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED,
                                        gateway_pb2.JOB_EVENT_TYPE_RESUMED]
    assert (events[2].attempt, events[2].stage, events[2].state) == (2, TRACK, RUNNING)
    assert "after its track stage" in events[2].message
    assert (REGISTRY.get_sample_value("mocap_gateway_job_takeovers_total") or 0.0) == takeovers_before + 1
    # Then the oldest QUEUED job, then the next; then nothing (the claims hold).
    assert (await store.claim_job("r1", "tok-3", now + HOUR_US)).job_id == _id(1)
    assert (await store.claim_job("r1", "tok-4", now + HOUR_US)).job_id == _id(2)
    assert await store.claim_job("r1", "tok-5", now + HOUR_US) is None
    # A released claim can be taken at once.
    await store.release_claim(_id(1), "wrong")
    assert await store.claim_job("r2", "tok-6", now + HOUR_US) is None
    await store.release_claim(_id(1), "tok-3")
    again = await store.claim_job("r2", "tok-6", now + HOUR_US)
    assert (again.job_id, again.claims) == (_id(1), 2)


async def test_renew_claims_returns_only_the_held(store):
    now = now_us()
    for n in range(3):
        await _make_job(store, _id(n), create_us=now - 1000 + n)
    tokens = {}
    for n in range(3):
        job = await store.claim_job("r1", f"tok-{n}", now + HOUR_US if n != 2 else now - 1)
        tokens[job.job_id] = job.claim_token
    assert await store.renew_claims("r1", {}, now + HOUR_US) == set()
    await store.transition(_id(1), CANCELLED)  # cancelled meanwhile
    assert (await store.claim_job("r2", "tok-other", now + HOUR_US)).job_id == _id(2)  # taken over
    assert await store.renew_claims("r1", tokens, now + 2 * HOUR_US) == {_id(0)}
    assert (await store.get_job(_id(0))).claim_expire_us == now + 2 * HOUR_US
    assert (await store.get_job(_id(2))).claim_expire_us == now + HOUR_US  # r2's, untouched
    assert await store.renew_claims("r2", {_id(0): "tok-0"}, now) == set()  # not r2's
    assert await store.renew_claims("r1", {_id(0): "tok-bad"}, now) == set()


async def test_fenced_writes_with_a_stale_token_do_nothing(store):
    now = now_us()
    await _make_job(store, _id(1))
    await store.claim_job("r1", "old", now - 1)
    await store.claim_job("r2", "new", now + HOUR_US)  # r1's claim lapsed; r2 took it over
    before = await store.get_job(_id(1))
    seqs = [e.seq for e in await store.events_after(_id(1), 0, 100)]

    assert not await store.record_stage_event(_id(1), _stage_event(SMOOTH, STARTED, 0.7), 0.7, claim_token="old")
    assert await store.transition(_id(1), SUCCEEDED, claim_token="old") is None
    assert await store.transition(_id(1), FAILED, error=JobError("INTERNAL", "x"), claim_token="old") is None
    assert not await store.record_checkpoint(_id(1), "old", TRACK, b"stale")
    assert await store.get_job(_id(1)) == before
    assert [e.seq for e in await store.events_after(_id(1), 0, 100)] == seqs

    event = _stage_event(TRACK, STARTED, 0.25)
    assert await store.record_stage_event(_id(1), event, 0.25, claim_token="new")
    assert event.state == RUNNING
    assert await store.record_checkpoint(_id(1), "new", TRACK, b"fresh")
    artifacts = (common_pb2.Artifact(name=f"jobs/{_id(1)}/artifacts/a.bvh", size_bytes=3),
                 common_pb2.Artifact(name=f"jobs/{_id(1)}/artifacts/a.glb", size_bytes=4))
    quality = common_pb2.QualityReport()
    done = await store.transition(_id(1), SUCCEEDED, artifacts=artifacts, quality=quality, message="done", claim_token="new")
    assert done.state == SUCCEEDED and done.artifacts == artifacts and (done.claim_owner, done.claim_token) == ("", "")
    stored = await store.get_job(_id(1))
    assert stored == done
    assert (stored.completed_stage, stored.checkpoint, stored.progress) == (TRACK, b"fresh", 1.0)
    last = (await store.events_after(_id(1), 0, 100))[-1]
    assert (last.type, last.state, last.message) == (gateway_pb2.JOB_EVENT_TYPE_STATE_CHANGED, SUCCEEDED, "done")
    assert list(last.job.artifacts) == list(artifacts)
    # Without a token the claim is not checked (the gateway's own cancel).
    await _make_job(store, _id(2))
    await store.claim_job("r1", "t2", now + HOUR_US)
    assert not await store.record_stage_event(_id(2), _stage_event(), 0.1, claim_token="nope")
    assert await store.record_stage_event(_id(2), _stage_event(), 0.1)
    assert (await store.get_job(_id(2))).progress == pytest.approx(0.1)
    assert (await store.transition(_id(2), CANCELLED, only_from=frozenset({QUEUED}))) is None
    assert (await store.transition(_id(2), CANCELLED, only_from=frozenset({RUNNING}))).state == CANCELLED


async def test_seq_is_gap_free_per_job(store):
    now = now_us()
    for n in range(2):
        await _make_job(store, _id(n), create_us=now - 10 + n)
        await store.claim_job("r1", f"tok-{n}", now + HOUR_US)
    for i in range(30):
        assert await store.record_stage_event(_id(i % 2), _stage_event(progress=i / 30), i / 30, claim_token=f"tok-{i % 2}")
    for n in range(2):
        events = await store.events_after(_id(n), 0, 1000)
        assert [e.seq for e in events] == list(range(1, 18))
        assert [e.seq for e in await store.events_after(_id(n), 5, 3)] == [6, 7, 8]
        assert await store.events_after(_id(n), 17, 10) == []
        times = [e.time.ToMicroseconds() for e in events]
        assert times == sorted(times)
    assert not await store.record_stage_event(_id(9), _stage_event(), 0.1)  # no such job


async def test_terminal_state_is_final(backend, store):
    await _make_job(store, _id(1))
    assert await store.transition(_id(1), SUCCEEDED) is None  # QUEUED cannot jump to SUCCEEDED
    assert (await store.transition(_id(1), RUNNING)).state == RUNNING
    assert await store.transition(_id(1), RUNNING) is None
    ended = await store.transition(_id(1), FAILED, error=JobError("STAGE_FAILED", "boom", TRACK))
    assert ended.state == FAILED and ended.end_us and ended.expire_us == ended.end_us + 60_000_000
    assert ended.stage == TRACK and ended.error == JobError("STAGE_FAILED", "boom", TRACK)
    for state in (RUNNING, SUCCEEDED, CANCELLED, FAILED):
        assert await store.transition(_id(1), state) is None
    assert not await store.record_stage_event(_id(1), _stage_event(), 0.9)
    assert await store.claim_job("r1", "tok", now_us() + HOUR_US) is None
    assert [e.seq for e in await store.events_after(_id(1), 0, 100)] == [1, 2, 3]
    assert (await store.events_after(_id(1), 2, 1))[0].message == "boom"
    # Even plain SQL cannot move it (the trigger), while other columns may still change.
    with pytest.raises(Exception, match="terminal"):
        await backend.raw(f"UPDATE jobs SET state = 'RUNNING' WHERE job_id = '{_id(1)}'")
    await backend.raw(f"UPDATE jobs SET expire_us = 1 WHERE job_id = '{_id(1)}'")
    assert (await store.get_job(_id(1))).state == FAILED


async def test_listing_expiry_and_delete(store):
    base = now_us() - 1_000_000
    for n in range(5):
        await _make_job(store, _id(n), create_us=base + n // 2)  # pairs with equal create_us
    await _make_job(store, _id(9), tenant="other", create_us=base)
    page = await store.list_jobs("t", 0, 2, None)
    assert [j.job_id for j in page] == [_id(4), _id(3)]
    page = await store.list_jobs("t", 0, 2, (page[-1].create_us, page[-1].job_id))
    assert [j.job_id for j in page] == [_id(2), _id(1)]
    page = await store.list_jobs("t", 0, 2, (page[-1].create_us, page[-1].job_id))
    assert [j.job_id for j in page] == [_id(0)]
    await store.transition(_id(3), CANCELLED)
    assert [j.job_id for j in await store.list_jobs("t", CANCELLED, 10, None)] == [_id(3)]
    assert [j.job_id for j in await store.jobs_in_state(QUEUED)] == [_id(0), _id(1), _id(9), _id(2), _id(4)]
    ended = await store.get_job(_id(3))
    assert await store.expired_jobs(ended.expire_us - 1) == []
    assert [j.job_id for j in await store.expired_jobs(ended.expire_us)] == [_id(3)]

    await store.transition(_id(4), RUNNING)
    await store.transition(_id(4), SUCCEEDED, artifacts=(common_pb2.Artifact(name="x", size_bytes=1),))
    await store.insert_upload(_upload(_id(20), request_id="dup-of-4"))
    await store.complete_upload_as(_id(20), _id(4))
    await store.delete_job(_id(4))
    assert await store.get_job(_id(4)) is None
    assert await store.events_after(_id(4), 0, 10) == []
    assert await store.find_upload("t", "dup-of-4") is None


# ---------------------------------------------------------------------------------------------
# PostgreSQL: two stores on one database (two replicas) at once


async def _running_job(store: Any, job_id: str, token: str) -> None:
    await _make_job(store, job_id)
    claimed = await store.claim_job("r1", token, now_us() + HOUR_US)
    assert claimed.job_id == job_id


async def test_pg_replicas_starting_together_migrate_once(pg):
    stores = await asyncio.gather(*(pg.open() for _ in range(4)))
    assert [await s.schema_version() for s in stores] == [2, 2, 2, 2]
    assert await pg.scalar("SELECT COUNT(*) FROM schema_migrations") == 2


async def test_pg_concurrent_appends_from_two_replicas_number_events_without_gap(pg):
    a, b = await pg.open(), await pg.open()
    await _running_job(a, _id(1), "tok")

    async def append(store: Any, task: int) -> None:
        for i in range(50):
            assert await store.record_stage_event(_id(1), _stage_event(progress=i / 50), i / 50, claim_token="tok")

    await asyncio.gather(*(append(a if t % 2 else b, t) for t in range(8)))
    events = await a.events_after(_id(1), 0, 10_000)
    assert [e.seq for e in events] == list(range(1, 8 * 50 + 3))
    assert await pg.scalar(f"SELECT last_seq FROM jobs WHERE job_id = '{_id(1)}'") == 8 * 50 + 2


async def test_pg_concurrent_claims_claim_each_job_once(pg):
    a, b = await pg.open(), await pg.open()
    base = now_us() - 1_000_000
    for n in range(10):
        await _make_job(a, _id(n), create_us=base + n)
    expire = now_us() + HOUR_US
    claimed = await asyncio.gather(*(store.claim_job(f"r{i}", f"tok-{i}", expire)
                                     for i in range(10) for store in (a, b)))
    ids = [job.job_id for job in claimed if job is not None]
    assert sorted(ids) == [_id(n) for n in range(10)]
    for n in range(10):
        job = await b.get_job(_id(n))
        assert job.state == RUNNING and job.claims == 1
        assert [e.seq for e in await b.events_after(_id(n), 0, 10)] == [1, 2]


async def test_pg_concurrent_request_id_one_wins(pg):
    a, b = await pg.open(), await pg.open()
    results = await asyncio.gather(*((a, b)[i % 2].insert_upload(_upload(_id(i), request_id="same"),
                                                                 max_active=100 if i % 4 < 2 else 0)
                                     for i in range(20)), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(r is None or isinstance(r, RequestIdTaken) for r in results), results
    assert len(await a.uploads()) == 1


async def test_pg_tenant_limit_holds_across_replicas(pg):
    a, b = await pg.open(), await pg.open()
    results = await asyncio.gather(*((a, b)[i % 2].insert_upload(_upload(_id(i)), max_active=4) for i in range(12)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 4
    assert all(r is None or isinstance(r, TooManyActive) for r in results), results
    assert await a.count_active("t") == 4


async def test_pg_content_dedup_holds_across_replicas(pg):
    a, b = await pg.open(), await pg.open()
    sha = "ef" * 32
    for n in range(10):
        await (a, b)[n % 2].insert_upload(_upload(_id(n), request_id=f"r{n}", sha256=sha))
    made = await asyncio.gather(*((a, b)[n % 2].create_job_from_upload(_id(n), _job(_id(n), sha256=sha, request_id=f"r{n}"))
                                  for n in range(10)))
    assert len({job.job_id for job in made}) == 1
    assert {u.job_id for u in await a.uploads()} == {made[0].job_id}
    assert len(await a.jobs_in_state(QUEUED)) == 1


async def test_pg_concurrent_stream_claims_one_wins(pg):
    a, b = await pg.open(), await pg.open()
    await a.insert_upload(_upload(_id(1), stream_expire_us=now_us() - 1))
    won = await asyncio.gather(*((a, b)[i % 2].claim_upload_stream(_id(1), f"r{i}", now_us() + HOUR_US, max_active=i % 2 * 10)
                                 for i in range(10)))
    assert sum(won) == 1


class _Arrivals:
    """on_event calls, with when they came (time.perf_counter())."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self._changed = asyncio.Event()

    def __call__(self, job_id: str) -> None:
        self.calls.append((job_id, time.perf_counter()))
        self._changed.set()

    async def wait_for(self, job_id: str, after: float, timeout_s: float = 5.0) -> float:
        deadline = time.perf_counter() + timeout_s
        while True:
            for got, at in self.calls:
                if got == job_id and at >= after:
                    return at
            remaining = deadline - time.perf_counter()
            assert remaining > 0, f"no on_event({job_id}) within {timeout_s}s"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass


async def test_pg_events_reach_the_other_replica_by_notify(pg):
    seen_a, seen_b = _Arrivals(), _Arrivals()
    a = await pg.open(on_event=seen_a)
    await pg.open(on_event=seen_b)  # b: only listens
    await _running_job(a, _id(1), "tok")
    await seen_b.wait_for(_id(1), 0)  # the create and claim reached b too
    from_call, from_commit = [], []
    for i in range(30):
        started = time.perf_counter()
        assert await a.record_stage_event(_id(1), _stage_event(progress=i / 30), i / 30, claim_token="tok")
        returned = time.perf_counter()
        arrived = await seen_b.wait_for(_id(1), started)
        from_call.append((arrived - started) * 1000)
        from_commit.append((arrived - returned) * 1000)
    assert any(job_id == _id(1) for job_id, _ in seen_a.calls)  # the writer is told too
    print(f"\nNOTIFY latency store A write -> store B on_event over {len(from_call)} events: "
          f"median {statistics.median(from_call):.2f} ms, max {max(from_call):.2f} ms from the call's start; "
          f"median {statistics.median(from_commit):.2f} ms after the call returned (negative: before)")
    assert statistics.median(from_call) < 1000


async def test_pg_listener_reconnects_after_losing_its_connection(pg):
    seen_b = _Arrivals()
    a, b = await pg.open(), await pg.open(on_event=seen_b)
    await _running_job(a, _id(1), "tok")
    await seen_b.wait_for(_id(1), 0)
    old_pid = b._listener.get_server_pid()
    await pg.raw(f"SELECT pg_terminate_backend({old_pid})")
    deadline = time.perf_counter() + 10
    while b._listener is None or b._listener.get_server_pid() == old_pid:
        assert time.perf_counter() < deadline, "the listener did not reconnect"
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    assert await a.record_stage_event(_id(1), _stage_event(), 0.3, claim_token="tok")
    await seen_b.wait_for(_id(1), started)
    # The store's own connections were not hurt.
    assert (await b.get_job(_id(1))).progress == pytest.approx(0.3)


async def test_pg_close_stops_the_listener(pg):
    store = await pg.open()
    pid = store._listener.get_server_pid()
    await store.close()
    pg.opened.remove(store)
    deadline = time.perf_counter() + 5
    while await pg.scalar(f"SELECT COUNT(*) FROM pg_stat_activity WHERE pid = {pid}"):
        assert time.perf_counter() < deadline, "the listener connection outlived close()"
        await asyncio.sleep(0.05)
    await store.close()  # twice is fine
