"""Database fixtures: a fresh SQLite file and a fresh database in a real, throwaway PostgreSQL.

One PostgreSQL cluster is started per test session (``postgres_url``), on 127.0.0.1 and a free
port, from the Debian server binaries; every test that needs PostgreSQL gets its own database in
it (``fresh_postgres_url``).  ``db_url`` / ``database`` run a test once per backend.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from server.db import Database

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT = 30.0


def _pg_bindir() -> Path:
    candidates = [Path(d) for d in glob.glob(PG_BIN_GLOB)
                  if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists()]
    if not candidates:
        on_path = shutil.which("initdb"), shutil.which("postgres")
        if all(on_path):
            return Path(on_path[0]).parent
        pytest.fail(f"PostgreSQL server binaries (initdb, postgres) not found in {PG_BIN_GLOB} "
                    "or on PATH: run `make test`, which installs the `postgresql` package",
                    pytrace=False)

    def version(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in path.parent.name.split("."))
        except ValueError:
            return (0,)

    return max(candidates, key=version)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scratch_dir() -> str | None:
    """Where the cluster lives: tmpfs if there is one (CREATE DATABASE 0.02 s, on disk 0.3 s)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return str(shm)
    return None


def _as_postgres_user() -> dict:
    """initdb/postgres refuse to run as root: as root, run them as the ``postgres`` user."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root but there is no `postgres` user to run the test cluster as: "
                    "run `make test`, which installs the `postgresql` package", pytrace=False)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _connect(port: int, dbname: str = "postgres"):
    import psycopg
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname,
                           connect_timeout=2, autocommit=True)


class _Cluster:
    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.owner = _as_postgres_user()
        self.base = Path(tempfile.mkdtemp(prefix="hausmeister-pg-", dir=_scratch_dir()))
        if self.owner:
            os.chown(self.base, self.owner["user"], self.owner["group"])
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def init(self) -> None:
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--no-locale", "--no-sync"],
            capture_output=True, text=True, cwd=self.base, **self.owner)
        if result.returncode != 0:
            pytest.fail(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}",
                        pytrace=False)

    def start(self) -> None:
        last_log = ""
        for _attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                     "-k", str(self.base), "-c", "listen_addresses=127.0.0.1",
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.base, **self.owner)
            if self._wait_ready():
                return
            last_log = self.log_path.read_text(errors="replace")[-4000:]
            self.stop()
        pytest.fail(f"PostgreSQL did not start on 127.0.0.1; log:\n{last_log}", pytrace=False)

    def _wait_ready(self) -> bool:
        import psycopg
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with _connect(self.port) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the maintenance database of a throwaway PostgreSQL cluster (one per session)."""
    cluster = _Cluster()
    try:
        cluster.init()
        cluster.start()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/postgres"
    finally:
        cluster.stop()
        cluster.remove()


@contextlib.contextmanager
def new_postgres_database(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty database in the session's cluster, dropped on leaving (for fixtures
    of a wider scope than one test)."""
    from sqlalchemy.engine import make_url
    url = make_url(postgres_url)
    name = f"t_{uuid.uuid4().hex[:16]}"
    with _connect(url.port) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with _connect(url.port) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty database in the session's cluster; dropped after the test."""
    with new_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    """URL of a fresh, empty database: an SQLite file, or a new database in the test cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hausmeister.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A migrated ``server.db.Database`` on a fresh database of each backend."""
    db = Database(db_url)
    db.migrate()
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def fast_password_hashing(monkeypatch) -> None:
    """Cheap argon2id parameters, so tests that log in many times stay fast.

    Still argon2id through the same code; only time/memory cost are lowered.  Tests of the
    production parameters must not use this fixture.
    """
    from argon2 import PasswordHasher

    from server import accounts
    cheap = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    monkeypatch.setattr(accounts, "_hasher", cheap)
    monkeypatch.setattr(accounts, "_DUMMY_HASH", cheap.hash("dummy password nobody has"))
