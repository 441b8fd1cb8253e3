"""The database layer on both backends: migrations, schema checks, WAL, transaction helper."""

from __future__ import annotations

import datetime as dt
import socket
import sqlite3

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from server.db import Database, DatabaseError, KeepChanges, _alembic_config
from server.db.models import Base, Tenant

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)


class Kept(KeepChanges, ValueError):
    pass


def _schema_diff(db: Database) -> list:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True,
                                                         "compare_server_default": True})
        return compare_metadata(context, Base.metadata)


def _tenant_names(db: Database) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(Tenant.name).order_by(Tenant.name)))


# --- migrations -------------------------------------------------------------------------------

def test_migration_creates_exactly_the_models_schema(database: Database) -> None:
    tables = set(inspect(database.engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert _schema_diff(database) == []


def test_schema_comparison_notices_a_difference(database: Database) -> None:
    # Guards the test above against comparing nothing: a missing index must show up.
    with database.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_certificates_identity"))
    diff = _schema_diff(database)
    assert [d[0] for d in diff] == ["add_index"]
    assert diff[0][1].name == "ix_certificates_identity"


def test_migrate_is_idempotent_and_check_current_accepts_head(database: Database) -> None:
    database.migrate()
    database.check_current()
    assert database.is_initialised()
    assert _schema_diff(database) == []


def test_downgrade_to_base_and_upgrade_again(database: Database) -> None:
    cfg = _alembic_config(database.engine)
    command.downgrade(cfg, "base")
    assert set(inspect(database.engine).get_table_names()) <= {"alembic_version"}
    database.migrate()
    assert _schema_diff(database) == []


def test_check_current_refuses_unmigrated_database(db_url: str) -> None:
    db = Database(db_url)
    try:
        assert not db.is_initialised()
        with pytest.raises(DatabaseError) as info:
            db.check_current()
        message = str(info.value)
        assert "no Hausmeister schema" in message
        assert "hausmeister-server migrate" in message
        assert "needs revision 0" in message  # says which revision it needs
        assert "None" not in message
        db.migrate()
        db.check_current()
        assert db.is_initialised()
    finally:
        db.dispose()


def test_check_current_refuses_unknown_revision(database: Database) -> None:
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(DatabaseError, match=r"9999.*hausmeister-server migrate"):
        database.check_current()


def test_unreachable_postgresql_gives_a_clear_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing")
    try:
        with pytest.raises(DatabaseError, match="cannot be reached"):
            db.migrate()
        with pytest.raises(DatabaseError, match="cannot be reached"):
            db.is_initialised()
    finally:
        db.dispose()


# --- SQLite specifics -------------------------------------------------------------------------

def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path) -> None:
    path = tmp_path / "state.db"
    db = Database(f"sqlite:///{path}")
    try:
        db.migrate()
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        # WAL is a property of the file: a plain sqlite3 connection sees it too.
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            raw.close()
    finally:
        db.dispose()


# --- the transaction helper -------------------------------------------------------------------

def test_session_commits_on_success(database: Database) -> None:
    with database.session() as session:
        session.add(Tenant(name="acme", created_at=NOW))
    assert _tenant_names(database) == ["acme"]
    with database.session() as session:
        created = session.scalar(select(Tenant.created_at))
    assert created == NOW and created.tzinfo is not None


def test_session_rolls_back_on_error(database: Database) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with database.session() as session:
            session.add(Tenant(name="lost", created_at=NOW))
            session.flush()  # really sent to the database, then rolled back
            raise RuntimeError("boom")
    assert _tenant_names(database) == []


def test_call_rolls_back_on_error_and_commits_on_success(database: Database) -> None:
    def add_then_fail(session, name):
        session.add(Tenant(name=name, created_at=NOW))
        session.flush()
        raise ValueError("refused")

    def add(session, name):
        session.add(Tenant(name=name, created_at=NOW))
        return name

    with pytest.raises(ValueError, match="refused"):
        database.call(add_then_fail, "lost")
    assert database.call(add, "kept") == "kept"
    assert _tenant_names(database) == ["kept"]


def test_keepchanges_exception_commits_before_propagating(database: Database) -> None:
    def add_then_refuse(session, name):
        session.add(Tenant(name=name, created_at=NOW))
        raise Kept(f"refused {name}")

    with pytest.raises(Kept, match="refused counted"):
        database.call(add_then_refuse, "counted")
    assert _tenant_names(database) == ["counted"]


def test_database_error_inside_transaction_rolls_back(database: Database) -> None:
    with database.session() as session:
        session.add(Tenant(name="acme", created_at=NOW))
    with pytest.raises(Exception) as info:
        with database.session() as session:
            session.add(Tenant(name="other", created_at=NOW))
            session.flush()
            session.add(Tenant(name="acme", created_at=NOW))  # unique name violated
            session.flush()
    assert "unique" in str(info.value).lower()
    assert _tenant_names(database) == ["acme"]


def test_naive_datetimes_are_refused(database: Database) -> None:
    with pytest.raises(Exception, match="naive datetime"):
        with database.session() as session:
            session.add(Tenant(name="naive", created_at=NOW.replace(tzinfo=None)))
    assert _tenant_names(database) == []
