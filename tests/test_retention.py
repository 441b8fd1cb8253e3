"""Retention against real protocol files (written by the real protocol writer) and both databases."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from sqlalchemy import select

from server import accounts, retention, settings_store
from server.config import from_mapping
from server.db.models import AuditEntry, Session, SessionEvent
from server.session_protocol import SessionProtocols

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def at(y, m, d, h=10) -> dt.datetime:
    return dt.datetime(y, m, d, h, tzinfo=UTC)


def write_protocol(base: Path, tenant: str, sid: str, start: dt.datetime, end: dt.datetime | None) -> Path:
    """A protocol file as the server writes it, with the file times of the events."""
    clock = [start]
    protocols = SessionProtocols(base, clock=lambda: clock[0])
    protocols.record(tenant, sid, "joined", "hausmeister:supporter:alice", "10.0.0.2")
    last = start
    if end is not None:
        clock[0] = last = end
        protocols.record(tenant, sid, "left", "hausmeister:supporter:alice", "10.0.0.2")
    path = base / protocols.file_of(tenant, sid)
    os.utime(path, (last.timestamp(), last.timestamp()))
    return path


def add_row(s, tenant_id, sid, start, end, protocol_file=None) -> None:
    s.add(Session(id=sid, tenant_id=tenant_id, kind="adhoc", created_at=start, started_at=start,
                  ended_at=end, protocol_file=protocol_file))
    s.flush()
    s.add(SessionEvent(session_id=sid, at=start, kind="joined", actor="alice"))
    if end:
        s.add(SessionEvent(session_id=sid, at=end, kind="ended", actor="server"))


def scenario(database, base: Path) -> dict[str, Path]:
    specs = {  # name: (tenant, start, end)
        "a-sep": ("Acme", at(2026, 9, 10), at(2026, 9, 10, 11)),          # old: goes, with its month
        "a-oct-old": ("Acme", at(2026, 10, 5), at(2026, 10, 5, 11)),     # old, but October is not
        "a-oct-new": ("Acme", at(2026, 10, 30), at(2026, 10, 30, 11)),   # young: stays
        "a-running": ("Acme", at(2026, 8, 15), None),                    # never ended: stays
        "b-dec": ("Beta", at(2025, 12, 1), at(2025, 12, 1, 11)),         # old: goes, year too
    }
    files = {}
    with database.session() as s:
        tenants = {n: accounts.get_or_create_tenant(s, n).id for n in ("Acme", "Beta")}
        for sid, (tenant, start, end) in specs.items():
            files[sid] = write_protocol(base, tenant, sid, start, end)
            add_row(s, tenants[tenant], sid, start, end, str(files[sid].relative_to(base)))
    # A file whose row is long gone (an orphan) in an old month, and what is never touched.
    files["orphan"] = write_protocol(base, "Acme", "orphan", at(2026, 7, 3), at(2026, 7, 3, 11))
    files["notes"] = base / "Acme" / "2026" / "06" / "notes.txt"
    files["notes"].parent.mkdir(parents=True)
    files["notes"].write_text("operator's own file")
    os.utime(files["notes"], (at(2026, 6, 2).timestamp(),) * 2)
    files["csv"] = base / "Acme" / "sessions.csv"
    files["csv"].write_text("session_id,kind\na-sep,adhoc\n")
    return files


def tree(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def ids(database) -> set[str]:
    return database.call(lambda s: set(s.scalars(select(Session.id))))


def test_zero_days_touches_nothing(database, tmp_path):
    base = tmp_path / "protocols"
    scenario(database, base)
    before, rows = tree(base), ids(database)
    report = database.call(retention.sweep, base, 0, NOW)
    assert report.empty
    assert tree(base) == before and ids(database) == rows
    assert database.call(lambda s: s.scalar(select(AuditEntry).where(
        AuditEntry.actor == retention.ACTOR))) is None


def test_sweep_deletes_old_sessions_files_and_whole_old_months_only(database, tmp_path, monkeypatch):
    monkeypatch.setattr(retention, "BATCH", 3)   # 4 old sessions: two batches
    base = tmp_path / "protocols"
    files = scenario(database, base)
    outside = tmp_path / "outside.jsonl"
    outside.write_text("not in the protocol folder\n")
    with database.session() as s:  # a row whose path points outside the folder: file stays
        add_row(s, None, "escape", at(2026, 1, 1), at(2026, 1, 1, 11), "../outside.jsonl")

    report = database.call(retention.sweep, base, 30, NOW)

    assert report.cutoff == NOW - dt.timedelta(days=30)
    assert ids(database) == {"a-oct-new", "a-running"}
    assert report.sessions == 4 and report.events == 8  # with "escape"
    left_events = database.call(lambda s: set(s.scalars(select(SessionEvent.session_id))))
    assert left_events == {"a-oct-new", "a-running"}
    for gone in ("a-sep", "a-oct-old", "b-dec", "orphan"):
        assert not files[gone].exists(), gone
    for kept in ("a-oct-new", "a-running", "notes", "csv"):
        assert files[kept].exists(), kept
    assert outside.exists()
    assert not (base / "Acme" / "2026" / "09").exists()     # September: entirely older, empty
    assert not (base / "Acme" / "2026" / "07").exists()     # the orphan's month
    assert (base / "Acme" / "2026" / "10").is_dir()         # October is not entirely older
    assert (base / "Acme" / "2026" / "08").is_dir()         # a running session's file
    assert (base / "Acme" / "2026" / "06").is_dir()         # a file that is not a protocol
    assert not (base / "Beta" / "2025").exists()            # month and emptied year
    assert (base / "Beta").is_dir()
    assert sorted(p.name for p in report.files) == sorted(
        ["a-sep.jsonl", "a-oct-old.jsonl", "b-dec.jsonl", "orphan.jsonl"])

    audit = database.call(lambda s: [(a.action, a.tenant_id, a.detail) for a in s.scalars(
        select(AuditEntry).where(AuditEntry.actor == retention.ACTOR).order_by(AuditEntry.id))])
    actions = [a for a, _, _ in audit]
    assert actions.count("retention.sessions_deleted") == 3   # Acme, Beta, no tenant
    sweep_entry = next(d for a, t, d in audit if a == "retention.sweep")
    assert "4 sessions" in sweep_entry and "4 protocol files" in sweep_entry
    assert all(t is not None for a, t, d in audit if a == "retention.sessions_deleted" and "2 sessions" in d)

    # A second run finds nothing more, and says nothing.
    again = database.call(retention.sweep, base, 30, NOW)
    assert again.empty
    assert len(database.call(lambda s: list(s.scalars(select(AuditEntry).where(
        AuditEntry.actor == retention.ACTOR))))) == len(audit)


def test_the_stored_setting_drives_the_daily_run(database, tmp_path):
    base = tmp_path / "protocols"
    config = from_mapping({"server": {"data_dir": str(tmp_path), "protocol_dir": str(base)}}, tmp_path)
    files = scenario(database, base)
    # The config file says keep forever: the run deletes nothing.
    assert database.call(retention._run, config, NOW).empty
    with database.session() as s:
        settings_store.put(s, settings_store.RETENTION_DAYS, "400", "admin")
    assert database.call(retention._run, config, NOW).empty      # nothing that old
    with database.session() as s:
        settings_store.put(s, settings_store.RETENTION_DAYS, 60, "admin")
    report = database.call(retention._run, config, NOW)
    assert {p.name for p in report.files} == {"a-sep.jsonl", "b-dec.jsonl", "orphan.jsonl"}
    assert files["a-oct-old"].exists()
