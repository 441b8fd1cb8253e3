"""Retention: deletes session records and protocol files older than the configured number of days.

``retention_days`` comes from the console (``server.settings_store``), default
``retention.protocol_days``; 0 keeps everything forever and this module touches nothing.

What goes, and what stays (conservative on purpose — a protocol is evidence):

* ``sessions`` rows that *ended* before the cut-off, with their ``session_events``; a session
  still running, or one that never recorded an end, stays.
* the protocol file of each deleted session (only inside the protocol folder).
* a month folder ``<tenant>/YYYY/MM`` only when the whole month lies before the cut-off: its
  ``*.jsonl`` files older than the cut-off whose session has no row any more; the folder (and an
  emptied year folder) is removed only once nothing else is left in it.
* the recordings of each deleted session (rows and files, folder or S3).
* ``<tenant>/sessions.csv`` (the billing list) is never touched.

Every run that deleted something is written to the audit log (per tenant and server-wide).
``sweep`` blocks (database, disk); ``service(app)`` runs it off the reactor once at start and
then daily.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session as DbSession
from twisted.application.service import Service
from twisted.internet import task

from protocol.runtime import Logger

from . import accounts, settings_store
from .db.models import Recording, Session, SessionEvent
from .session_protocol import check_session_id, find_session, ProtocolError

log = Logger(namespace="hausmeister.retention")

ACTOR = "retention"
INTERVAL_SECONDS = 24 * 3600.0
BATCH = 500
_YEAR = re.compile(r"\d{4}\Z")
_MONTH = re.compile(r"(0[1-9]|1[0-2])\Z")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class SweepReport:
    cutoff: dt.datetime | None = None
    sessions: int = 0
    events: int = 0
    recordings: int = 0
    files: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    per_tenant: Counter = field(default_factory=Counter)

    @property
    def empty(self) -> bool:
        return not (self.sessions or self.files or self.folders)

    def summary(self) -> str:
        return (f"cut-off {self.cutoff:%Y-%m-%d %H:%M} UTC: {self.sessions} sessions, "
                f"{self.events} events, {len(self.files)} protocol files, "
                f"{self.recordings} recordings, "
                f"{len(self.folders)} folders deleted")


def _inside(base: Path, relative: str) -> Path | None:
    """``base/relative`` if it stays inside ``base`` and is a protocol file, else None."""
    try:
        path = (base / relative).resolve()
    except (OSError, ValueError):
        return None
    if path.suffix != ".jsonl" or base not in path.parents:
        return None
    return path


def _files_of(base: Path, session_id: str, protocol_file: str | None) -> list[Path]:
    if protocol_file:
        path = _inside(base, protocol_file)
        return [path] if path is not None else []
    try:
        return [p.resolve() for p in find_session(base, session_id)]
    except ProtocolError:
        return []


def _month_end(year: int, month: int) -> dt.datetime:
    """The first instant after the month (UTC)."""
    return dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.timezone.utc)


def _old_months(base: Path, cutoff: dt.datetime) -> list[Path]:
    """Month folders ``<tenant>/YYYY/MM`` whose whole month lies before the cut-off."""
    found = []
    for tenant in sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()):
        for year in sorted(p for p in tenant.iterdir() if p.is_dir() and _YEAR.match(p.name)):
            for month in sorted(p for p in year.iterdir() if p.is_dir() and _MONTH.match(p.name)):
                if _month_end(int(year.name), int(month.name)) <= cutoff and not month.is_symlink():
                    found.append(month)
    return found


def _delete_batch(session: DbSession, base: Path, cutoff: dt.datetime, report: SweepReport,
                  recordings: Any = None) -> int:
    """Delete up to BATCH ended sessions (rows committed first, then their files) with their
    recordings (``recordings(storage, location)`` removes a recording's file)."""
    rows = session.execute(
        select(Session.id, Session.tenant_id, Session.protocol_file)
        .where(Session.ended_at.is_not(None), Session.ended_at < cutoff)
        .order_by(Session.ended_at, Session.id).limit(BATCH)).all()
    if not rows:
        return 0
    ids = [r.id for r in rows]
    files = [p for r in rows for p in _files_of(base, r.id, r.protocol_file)] if base.is_dir() else []
    report.events += session.execute(
        delete(SessionEvent).where(SessionEvent.session_id.in_(ids))).rowcount or 0
    stored = session.execute(select(Recording.storage, Recording.location)
                             .where(Recording.session_id.in_(ids))).all()
    session.execute(delete(Recording).where(Recording.session_id.in_(ids)))
    session.execute(delete(Session).where(Session.id.in_(ids)))
    session.commit()
    report.sessions += len(ids)
    report.per_tenant.update(r.tenant_id for r in rows)
    for path in files:
        if path.is_file():
            path.unlink()
            report.files.append(path)
    for kind, location in stored:
        report.recordings += 1
        if recordings is not None:
            try:
                recordings(kind, location)
            except Exception as exc:  # the row is gone; the file is the operator's to remove
                log.error("retention: recording {location} not deleted: {why}",
                          location=location, why=str(exc))
    return len(rows)


def _existing_ids(session: DbSession, stems: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(stems), BATCH):
        found |= set(session.scalars(select(Session.id).where(Session.id.in_(stems[start:start + BATCH]))))
    return found


def _sweep_month(session: DbSession, month: Path, cutoff: dt.datetime, report: SweepReport) -> None:
    files = [p for p in month.iterdir() if p.suffix == ".jsonl" and p.is_file() and not p.is_symlink()]
    stems = []
    for p in files:
        try:
            stems.append(check_session_id(p.stem))
        except ProtocolError:
            continue
    alive = _existing_ids(session, stems)
    for path in files:
        if path.stem in alive or path.lstat().st_mtime >= cutoff.timestamp():
            continue
        path.unlink(missing_ok=True)
        report.files.append(path)
    for folder in (month, month.parent):
        try:
            folder.rmdir()  # only succeeds when nothing else is left
        except OSError:
            break
        report.folders.append(folder)


def _audit(session: DbSession, days: int, report: SweepReport) -> None:
    for tenant_id, count in sorted(report.per_tenant.items(), key=lambda kv: kv[0] or 0):
        accounts.audit(session, ACTOR, "retention.sessions_deleted",
                       f"{count} sessions ended before {report.cutoff:%Y-%m-%d} deleted "
                       f"(retention {days} days)", tenant_id=tenant_id)
    accounts.audit(session, ACTOR, "retention.sweep", f"retention {days} days, " + report.summary())


def sweep(session: DbSession, protocol_dir: Path | str, days: int,
          now: dt.datetime | None = None, recordings: Any = None) -> SweepReport:
    """Delete what is older than ``days`` (see the module text); ``days == 0`` touches nothing.

    The row deletions are committed before any file is removed, so a failure part-way leaves at
    worst files without rows (the next run's month sweep takes them), never rows without files.
    """
    now = now or utcnow()
    report = SweepReport()
    if days <= 0:
        return report
    report.cutoff = cutoff = now - dt.timedelta(days=days)
    base = Path(protocol_dir).resolve()
    while _delete_batch(session, base, cutoff, report, recordings) == BATCH:
        pass
    if base.is_dir():
        for month in _old_months(base, cutoff):
            _sweep_month(session, month, cutoff, report)
    if not report.empty:
        _audit(session, days, report)
    return report


def _run(session: DbSession, config: Any, now: dt.datetime) -> SweepReport:
    days = settings_store.get(session, config, settings_store.RETENTION_DAYS)
    from .recordings.storage import storage_named
    return sweep(session, config.server.protocol_dir, days, now,
                 recordings=lambda kind, location: storage_named(config, kind).delete(location))


class RetentionService(Service):
    """Runs ``sweep`` off the reactor at start and then every ``interval`` seconds."""

    def __init__(self, app: Any, interval: float = INTERVAL_SECONDS) -> None:
        self.app = app
        self.interval = interval
        self._loop: task.LoopingCall | None = None

    def tick(self):
        d = self.app.db.run(_run, self.app.config, utcnow())

        def done(report: SweepReport) -> None:
            if not report.empty:
                log.info("retention: {summary}", summary=report.summary())

        d.addCallbacks(done, lambda f: log.failure("retention run failed; nothing more deleted", f))
        return d

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.tick)
        if getattr(self.app, "reactor", None) is not None:
            self._loop.clock = self.app.reactor
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def service(app: Any) -> Service:
    return RetentionService(app)
