"""A throwaway real PostgreSQL server for tests (../shared/notes/real-servers.md's recipe).

One server per test session on a free port, a fresh database per test:

    from tests.pgserver import postgres_server, postgres_url  # noqa: F401  (pytest fixtures)

    async def test_something(postgres_url):
        conn = await asyncpg.connect(postgres_url)

`PostgresServer` is a context manager: `initdb` into a temp dir, `pg_ctl start` on a free port
(TCP on 127.0.0.1 plus a unix socket in the temp dir; trust authentication; fsync off), and on every
way out `pg_ctl stop -m fast`, then `-m immediate`, then SIGKILL, and the temp dir removed.
Binaries come from Debian's /usr/lib/postgresql/<version>/bin (not on PATH) or from PATH; the
highest version found wins. `initdb` refuses to run as root, so as root the server runs as the
unprivileged user `pgtest` (created with `useradd -M` when missing).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support import free_port

PG_USER = "pgtest"
SUPERUSER = "postgres"
_REQUIRED = ("initdb", "pg_ctl")
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 30

# Settings for a disposable server: speed over durability, enough connections for several gateway
# replicas with their pools, no listening anywhere but loopback.
_SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "logging_collector": "off",
}


def _version_of(bin_dir: Path) -> tuple[int, ...]:
    """`initdb --version` → (15, 8); (0,) when it cannot be read."""
    try:
        out = subprocess.run([str(bin_dir / "initdb"), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    match = re.search(r"(\d+(?:\.\d+)*)", out)
    return tuple(int(part) for part in match.group(1).split(".")) if match else (0,)


def find_bin_dir() -> Path | None:
    """The directory of the highest-version PostgreSQL server binaries (initdb and pg_ctl side by
    side), from /usr/lib/postgresql/*/bin and PATH; None when there are none."""
    candidates: dict[Path, Path] = {}  # real dir -> dir as found
    for found in glob.glob("/usr/lib/postgresql/*/bin"):
        candidates.setdefault(Path(found).resolve(), Path(found))
    initdb_on_path = shutil.which("initdb")
    if initdb_on_path:
        # Debian links /usr/local/bin/initdb (or a user does) to the versioned directory: follow it.
        real = Path(initdb_on_path).resolve().parent
        candidates.setdefault(real, real)
    usable = [path for path in candidates.values()
              if all(os.access(path / name, os.X_OK) for name in _REQUIRED)]
    if not usable:
        return None
    return max(usable, key=_version_of)


def available() -> bool:
    """Whether a PostgreSQL server can be started here (its binaries are installed)."""
    return find_bin_dir() is not None


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", PG_USER], check=True,
                       capture_output=True, timeout=30)
        return pwd.getpwnam(PG_USER)


def _traversable_by_others(path: Path) -> bool:
    """Whether every directory from / down to `path` lets other users through (x for others)."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


class PgCommandError(RuntimeError):
    """initdb or pg_ctl exited non-zero (the message carries its output)."""


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A PostgreSQL server in a temp dir for as long as the `with` block (or start()..stop()) lasts."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin "
                               "or on PATH; install Debian's `postgresql` package")
        self.bin_dir = Path(found)
        self.port: int | None = None
        self.tmp: Path | None = None
        self._running = False
        self._as_user: pwd.struct_passwd | None = None

    # --- paths ----------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp

    @property
    def log_path(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        assert self.port is not None, "server not started"
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "PostgresServer":
        try:
            self._make_tmp()
            self._pg(["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync"], timeout=120)
            with open(self.data_dir / "postgresql.conf", "a") as conf:
                conf.write("\n# tests/pgserver.py\n")
                conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
                for key, value in _SERVER_SETTINGS.items():
                    conf.write(f"{key} = {value}\n")
            # free_port() can race with another process taking the port: try a few.
            last_error: Exception | None = None
            for _ in range(3):
                self.port = free_port()
                try:
                    self._pg(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                              "-t", str(_START_TIMEOUT_S), "-o", f"-p {self.port}", "start"],
                             timeout=_START_TIMEOUT_S + 10)
                    self._running = True
                    break
                except (PgCommandError, subprocess.TimeoutExpired) as exc:
                    last_error = exc
                    self._stop_server()  # a half-started server (timeout) must not stay behind
            if not self._running:
                raise RuntimeError(f"PostgreSQL did not start: {last_error}\n{self.log_text()[-3000:]}")
            atexit.register(self.stop)  # a session that ends without fixture teardown still stops it
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stops the server (fast, then immediate, then SIGKILL) and removes the temp dir. Idempotent."""
        try:
            if self.tmp is not None and self.data_dir.is_dir():
                self._stop_server()
        finally:
            self._running = False
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            atexit.unregister(self.stop)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    # --- databases ------------------------------------------------------------------------------
    def create_database(self) -> str:
        """A fresh empty database (`CREATE DATABASE t_<random> TEMPLATE template0`); its URL."""
        name = f"t_{secrets.token_hex(8)}"
        self.execute(f"CREATE DATABASE {_quote_ident(name)} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drops the database `url` names, closing whatever connections are still open to it."""
        name = urlsplit(url).path.lstrip("/")
        if not name or name in ("postgres", "template0", "template1"):
            raise ValueError(f"refusing to drop {name!r}")
        self.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Runs one statement as the superuser (asyncpg when installed, else psql). Callable from
        inside a running event loop too (asyncpg runs on a thread of its own)."""
        assert self._running, "server not started"
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            self._psql(sql, dbname)
            return

        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url(dbname), timeout=30)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result(timeout=60)

    def _psql(self, sql: str, dbname: str) -> None:
        psql = self.bin_dir / "psql"
        command = str(psql) if psql.exists() else (shutil.which("psql") or "psql")
        done = subprocess.run([command, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", SUPERUSER, "-d", dbname, "-c", sql],
                              capture_output=True, text=True, timeout=60, env=self._env())
        if done.returncode != 0:
            raise PgCommandError(f"psql failed (exit {done.returncode}) on {sql!r}: {done.stderr.strip()}")

    # --- internals ------------------------------------------------------------------------------
    def _make_tmp(self) -> None:
        if os.geteuid() == 0:
            self._as_user = _ensure_user()
            # The server user must reach its directory: a TMPDIR under /root would not do.
            base = Path(tempfile.gettempdir())
            root = base if _traversable_by_others(base) else Path("/tmp")
            self.tmp = Path(tempfile.mkdtemp(prefix="pgtest-", dir=root))
            os.chmod(self.tmp, 0o755)
            os.chown(self.tmp, self._as_user.pw_uid, self._as_user.pw_gid)
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix="pgtest-"))

    def _env(self) -> dict[str, str]:
        # No PG* variables from the caller's environment (PGDATA, PGHOST, ...) and a locale that exists.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if self._as_user is not None:
            env.update(HOME=str(self.tmp), USER=PG_USER, LOGNAME=PG_USER)
        return env

    def _pg(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Runs one of the server binaries (as `pgtest` when we are root); raises with its output."""
        kwargs: dict = {}
        if self._as_user is not None:
            kwargs = dict(user=self._as_user.pw_uid, group=self._as_user.pw_gid, extra_groups=[])
        try:
            return subprocess.run([str(self.bin_dir / argv[0]), *argv[1:]], cwd=self.tmp, env=self._env(),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                                  check=True, **kwargs)
        except subprocess.CalledProcessError as exc:
            output = (exc.stderr or "").strip() or (exc.stdout or "").strip()
            raise PgCommandError(f"{argv[0]} {argv[-1]} failed (exit {exc.returncode}): {output}") from None

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _stop_server(self) -> None:
        pid = self._postmaster_pid()
        if pid is None:
            return
        for mode in ("fast", "immediate"):
            try:
                self._pg(["pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(_STOP_TIMEOUT_S), "-m", mode, "stop"],
                         timeout=_STOP_TIMEOUT_S + 10)
                return
            except (PgCommandError, subprocess.TimeoutExpired, OSError):
                if not _alive(pid):
                    return
        # pg_ctl could not stop it: kill the postmaster; its backends exit when it is gone.
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


# --- pytest fixtures --------------------------------------------------------------------------

_MISSING = ("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or on PATH: "
            "install Debian's `postgresql` package (.ci/run does) to run the PostgreSQL tests")


# Each test module that imports the fixture gets a fixture definition of its own (pytest registers
# imported fixtures per module), so the session's one server is shared here and counted: started by
# the first user, stopped when the last one's teardown (at the session's end) runs.
_shared: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole test session; skipped when none is installed (in CI,
    where .ci/run installs it, a missing server fails instead of skipping silently)."""
    global _shared, _users
    if not available():
        if os.environ.get("CI"):
            pytest.fail(_MISSING)
        pytest.skip(_MISSING)
    if _shared is None:
        _shared = PostgresServer().start()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            server, _shared = _shared, None
            server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh empty database for one test (its URL); dropped afterwards."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)
