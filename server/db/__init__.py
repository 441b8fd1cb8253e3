"""The one database access layer: engine, transactional sessions, migrations.

Calls here block; on the reactor thread go through ``protocol.runtime.run_blocking``
(``Database.run`` does that for you).  SQLite runs in WAL mode; PostgreSQL is used by URL.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import models

T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"


class KeepChanges(Exception):
    """Mixin for refusals that must still commit what was recorded (e.g. a failed-login count)."""


class DatabaseError(RuntimeError):
    """The database cannot be used; the message says what to do."""


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    return engine


def _alembic_config(engine: Engine):
    from alembic.config import Config as AlembicConfig
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commits on success, rolls back on any exception."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except KeepChanges:
                session.commit()
                raise
            except BaseException:
                session.rollback()
                raise

    def run(self, fn: Callable[..., T], *args: Any) -> Any:
        """Run ``fn(session, *args)`` in a transaction off the reactor thread (a Deferred)."""
        from protocol.runtime import run_blocking
        return run_blocking(self.call, fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        with self.session() as session:
            return fn(session, *args)

    def call_core(self, fn: Callable[..., T], *args: Any) -> T:
        """``call`` on a Core connection instead of an ORM session: ``fn(connection, *args)`` in
        one transaction (commit on success, rollback on any exception).  For hot paths written
        with Core statements only; the ORM session's set-up and bookkeeping cost ~150 µs per
        transaction there (server.session_commit)."""
        with self.engine.begin() as connection:
            return fn(connection, *args)

    def run_core(self, fn: Callable[..., T], *args: Any) -> Any:
        """``call_core`` off the reactor thread (a Deferred)."""
        from protocol.runtime import run_blocking
        return run_blocking(self.call_core, fn, *args)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from alembic import command
        try:
            command.upgrade(_alembic_config(self.engine), "head")
        except OperationalError as exc:
            raise DatabaseError(f"database {self.safe_url} cannot be reached: {exc.orig}") from exc

    def is_initialised(self) -> bool:
        try:
            return inspect(self.engine).has_table("tenants")
        except OperationalError as exc:
            raise DatabaseError(f"database {self.safe_url} cannot be reached: {exc.orig}") from exc

    def check_current(self) -> None:
        """Refuse to run on a schema older or newer than this code."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory
        script = ScriptDirectory.from_config(_alembic_config(self.engine))
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current is None:
            raise DatabaseError(
                f"database {self.safe_url} has no Hausmeister schema yet (this server needs "
                f"revision {script.get_current_head()}): run `hausmeister-server migrate`")
        if current != script.get_current_head():
            raise DatabaseError(
                f"database schema is at revision {current}, this server needs "
                f"{script.get_current_head()}: run `hausmeister-server migrate`")

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


__all__ = ["Database", "DatabaseError", "KeepChanges", "models"]
