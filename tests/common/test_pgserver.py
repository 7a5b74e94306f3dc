"""tests/pgserver.py: a real PostgreSQL server starts, serves fresh databases, and leaves nothing
behind (no process, no port, no temp dir) when it stops."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import pgserver
from tests.pgserver import PostgresServer, postgres_server, postgres_url  # noqa: F401  (fixtures)

asyncpg = pytest.importorskip("asyncpg")


def _can_bind(port: int) -> bool:
    """Whether a listening server could take `port` now (SO_REUSEADDR, as PostgreSQL itself sets)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            return False
        except ConnectionRefusedError:
            return True


@pytest.fixture
def own_server():
    """A server of this test's own (the session one must outlive the test)."""
    if not pgserver.available():
        pytest.skip(pgserver._MISSING)
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


async def test_server_starts_serves_fresh_databases_and_leaves_nothing_behind(own_server):
    server = own_server.start()
    port, tmp = server.port, server.tmp
    assert tmp is not None and tmp.is_dir() and not _can_bind(port)
    assert server.url() == f"postgresql://postgres@127.0.0.1:{port}/postgres"

    conn = await asyncpg.connect(server.url())
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
    finally:
        await conn.close()

    first, second = server.create_database(), server.create_database()
    assert first != second
    names = [urlsplit(url).path.lstrip("/") for url in (first, second)]
    assert all(name.startswith("t_") for name in names)
    # Each is its own empty database: a table made in one is not in the other.
    a, b = await asyncpg.connect(first), await asyncpg.connect(second)
    try:
        assert await a.fetchval("SELECT current_database()") == names[0]
        assert await b.fetchval("SELECT current_database()") == names[1]
        await a.execute("CREATE TABLE only_here (x int)")
        assert await b.fetchval("SELECT to_regclass('only_here')") is None
    finally:
        await a.close()
        # `b` stays open: drop_database must close it (WITH FORCE), as a test's leftover pool would be.

    server.drop_database(first)
    server.drop_database(second)
    assert b.is_closed() or await _closed_by_server(b)
    conn = await asyncpg.connect(server.url())
    try:
        left = await conn.fetch("SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", names)
        assert left == []
    finally:
        await conn.close()

    server.stop()
    assert server.tmp is None and not tmp.exists()
    assert _refused(port) and _can_bind(port)
    server.stop()  # idempotent


async def _closed_by_server(conn) -> bool:
    try:
        await conn.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError, OSError):
        return True
    finally:
        conn.terminate()
    return False


def test_start_failure_cleans_up(own_server, monkeypatch):
    """A failure during start (here: initdb) leaves no temp dir and no server behind."""
    made: list[Path] = []
    real_make_tmp = own_server._make_tmp

    def make_tmp():
        real_make_tmp()
        made.append(own_server.tmp)

    monkeypatch.setattr(own_server, "_make_tmp", make_tmp)
    monkeypatch.setattr(pgserver, "SUPERUSER", "")  # initdb -U "" is refused
    with pytest.raises(RuntimeError, match="initdb"):
        own_server.start()
    assert made and not made[0].exists() and own_server.tmp is None


def test_fixture_gives_each_test_a_fresh_database(postgres_url, postgres_server):
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/t_")
    assert postgres_url != postgres_server.url()


def test_highest_version_wins(tmp_path, monkeypatch):
    for version in ("9.6", "15", "16"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        for name in ("initdb", "pg_ctl"):
            (bin_dir / name).write_text(f"#!/bin/sh\necho 'initdb (PostgreSQL) {version}.2'\n")
            (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(pgserver.glob, "glob", lambda pattern: [str(tmp_path / v / "bin") for v in ("9.6", "16", "15")])
    monkeypatch.setattr(pgserver.shutil, "which", lambda name: None)
    assert pgserver.find_bin_dir() == tmp_path / "16" / "bin"
    monkeypatch.setattr(pgserver.glob, "glob", lambda pattern: [])
    assert pgserver.find_bin_dir() is None and not pgserver.available()
