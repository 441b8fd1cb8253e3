"""The sessions pages: a tenant's sessions (filterable, CSV), and one session with its protocol.

The list and its CSV export share one query (text, kind, from/to date).  The detail page reads
the session's hash-chained protocol file with the reader ``hausmeister-server protocol show``
uses and says plainly whether the chain verifies; another tenant's session is "not found".
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import or_, select

from protocol.runtime import run_blocking

from .. import session_protocol as sp
from ..db.models import Host, Tenant
from ..db.models import Session as SessionRow
from ..i18n import Text
from .core import MAX_QUERY, MAX_ROWS, Ctx, PageError, route
from .pages_help import link_outside_urls

KINDS = ("adhoc", "host")
#: a protocol longer than this is shown up to here (the CSV carries every line)
MAX_TIMELINE = 5000
CSV_CONTENT_TYPE = b"text/csv; charset=utf-8"


# --- the filtered list --------------------------------------------------------------------------

@dataclass(frozen=True)
class Filter:
    """What the list is narrowed to; built from the query string, checked before any query."""

    text: str = ""
    kind: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    @classmethod
    def from_ctx(cls, ctx: Ctx) -> "Filter":
        kind = ctx.arg("kind", 20).strip()
        if kind and kind not in KINDS:
            raise PageError(400, Text("kind '%(kind)s': choose adhoc, host or any", kind=kind))
        date_from = _date(ctx.arg("from", 20), Text("From"))
        date_to = _date(ctx.arg("to", 20), Text("To"))
        if date_from and date_to and date_from > date_to:
            raise PageError(400, Text("from %(start)s is after to %(end)s: no session can match",
                                      start=date_from.isoformat(), end=date_to.isoformat()))
        return cls(ctx.arg("q", MAX_QUERY).strip(), kind, date_from, date_to)

    def query_string(self) -> str:
        pairs = {"q": self.text, "kind": self.kind,
                 "from": self.date_from.isoformat() if self.date_from else "",
                 "to": self.date_to.isoformat() if self.date_to else ""}
        return urlencode({k: v for k, v in pairs.items() if v})


def _instant(value) -> dt.datetime | None:
    """A protocol line's ISO time as a datetime (the page writes it in the reader's locale)."""
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _date(text: str, name: Text) -> dt.date | None:
    text = text.strip()
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise PageError(400, Text("%(name)s: date '%(text)s': expected YYYY-MM-DD, e.g. "
                                  "2026-11-01", name=name, text=text)) from None


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


def _sessions(session, tenant_id: int, f: Filter) -> list[dict[str, Any]]:
    stmt = (select(SessionRow, Host.name).outerjoin(Host, SessionRow.host_id == Host.id)
            .where(SessionRow.tenant_id == tenant_id))
    if f.text:
        stmt = stmt.where(or_(SessionRow.supporter_identity.contains(f.text, autoescape=True),
                              SessionRow.peer_identity.contains(f.text, autoescape=True),
                              SessionRow.peer_address.contains(f.text, autoescape=True),
                              SessionRow.end_reason.contains(f.text, autoescape=True),
                              Host.name.contains(f.text, autoescape=True),
                              SessionRow.id.startswith(f.text, autoescape=True)))
    if f.kind:
        stmt = stmt.where(SessionRow.kind == f.kind)
    if f.date_from:
        stmt = stmt.where(SessionRow.created_at >= _midnight(f.date_from))
    if f.date_to:  # the whole "to" day is in
        stmt = stmt.where(SessionRow.created_at < _midnight(f.date_to) + dt.timedelta(days=1))
    rows = session.execute(stmt.order_by(SessionRow.created_at.desc()).limit(MAX_ROWS)).all()
    return [_facts(s, host) for s, host in rows]


def _facts(s: SessionRow, host_name: str | None) -> dict[str, Any]:
    started = s.started_at or s.created_at
    duration = (s.ended_at - started).total_seconds() if s.ended_at and started else None
    return {"id": s.id, "kind": s.kind, "supporter": s.supporter_identity or "",
            "supporter_address": s.supporter_address or "",
            "peer": s.peer_identity or "", "peer_address": s.peer_address or "",
            "host": host_name or "", "created": s.created_at, "started": started,
            "ended": s.ended_at, "duration_s": duration,
            "bytes_to_peer": s.bytes_to_peer or 0, "bytes_to_supporter": s.bytes_to_supporter or 0,
            "end_reason": s.end_reason or "", "protocol_file": s.protocol_file or "",
            "protocol_mailed_at": s.protocol_mailed_at,
            "anchor": (s.protocol_end_seq, s.protocol_end_hash) if s.protocol_end_hash else None}


@route("GET", "sessions")
def sessions(ctx: Ctx):
    f = Filter.from_ctx(ctx)
    d = ctx.run(_sessions, ctx.session.tenant_id, f)
    return d.addCallback(lambda rows: ctx.page(
        "sessions.html", rows=rows, q=f.text, f=f, kinds=KINDS, max_rows=MAX_ROWS,
        csv_query=f.query_string()))


# --- CSV ----------------------------------------------------------------------------------------

def csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    """CSV with the csv module's quoting; every cell a spreadsheet could run as a formula
    (starting with = + - @) gets a leading ' so it stays text."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        writer.writerow([sp.csv_text(cell) if isinstance(cell, str) else cell for cell in row])
    return out.getvalue().encode("utf-8")


def _iso(when: dt.datetime | None) -> str:
    return sp.format_time(when) if when else ""


SESSIONS_CSV_HEADER = ["session_id", "kind", "created", "start", "end", "duration_s", "supporter",
                       "supporter_address", "peer", "peer_address", "host", "bytes_to_peer",
                       "bytes_to_supporter", "end_reason"]


@route("GET", "sessions.csv")
def sessions_csv(ctx: Ctx):
    f = Filter.from_ctx(ctx)

    def rows(facts: list[dict[str, Any]]) -> bytes:
        body = csv_bytes(SESSIONS_CSV_HEADER, [[
            s["id"], s["kind"], _iso(s["created"]), _iso(s["started"]), _iso(s["ended"]),
            "" if s["duration_s"] is None else f"{s['duration_s']:.3f}", s["supporter"],
            s["supporter_address"], s["peer"], s["peer_address"], s["host"], s["bytes_to_peer"],
            s["bytes_to_supporter"], s["end_reason"]] for s in facts])
        return ctx.download(body, CSV_CONTENT_TYPE, f"sessions-{ctx.session.tenant}.csv")

    return ctx.run(_sessions, ctx.session.tenant_id, f).addCallback(rows)


# --- one session and its protocol ---------------------------------------------------------------

@dataclass
class Timeline:
    """The protocol file of a session as rows, with the verdict of the hash chain."""

    path: str = ""                       # relative to the protocol folder
    events: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    verified: bool = False
    broken_line: int = 0                 # 0: the chain holds (or there is no file)
    problem: str = ""
    ended: bool = False
    anchored: bool = False               # its end matches the one the database recorded
    missing: Any = ""                    # why there is no timeline (an i18n.Text)


def _session_and_tenant(session, tenant_id: int, session_id: str) -> tuple[dict[str, Any], str]:
    row = session.execute(
        select(SessionRow, Host.name).outerjoin(Host, SessionRow.host_id == Host.id)
        .where(SessionRow.id == session_id, SessionRow.tenant_id == tenant_id)).first()
    if row is None:  # another tenant's session looks exactly like one that does not exist
        raise PageError(404, Text("no session %(id)s in this tenant", id=session_id))
    tenant = session.get(Tenant, tenant_id)
    return _facts(row[0], row[1]), tenant.name


def protocol_path(protocol_dir: Path, tenant: str, session_id: str, recorded: str) -> Path | None:
    """The session's protocol file inside the tenant's folder: the recorded relative path if it
    stays there, else a search of the tenant's months."""
    try:
        sp.check_session_id(session_id)
    except sp.ProtocolError:
        return None
    base = (Path(protocol_dir) / sp.tenant_folder(tenant)).resolve()
    if recorded:
        candidate = (Path(protocol_dir) / recorded).resolve()
        if candidate.is_relative_to(base) and candidate.name == f"{session_id}.jsonl" \
                and candidate.is_file():
            return candidate
    found = sorted(base.glob(f"[0-9][0-9][0-9][0-9]/[0-9][0-9]/{session_id}.jsonl"), reverse=True)
    return found[0] if found else None


def _detail_text(detail: Any) -> str:
    if not isinstance(detail, dict):
        return ""
    keys = [k for k in sp.FIRST_KEYS if k in detail] + sorted(k for k in detail if k not in sp.FIRST_KEYS)
    return " ".join(f"{k}={sp.display_value(detail[k], 200)}" for k in keys if detail[k] not in (None, ""))


def read_timeline(protocol_dir: Path, tenant: str, session_id: str, recorded: str,
                  limit: int = MAX_TIMELINE, anchor: tuple[int, str] | None = None) -> Timeline:
    """Blocking: read and verify the session's protocol (``protocol show`` / ``verify``), and its
    end against the ``ended`` line the database recorded (``anchor``)."""
    path = protocol_path(protocol_dir, tenant, session_id, recorded)
    if path is None:
        return Timeline(missing=Text("no protocol file for this session in the protocol folder "
                                     "(written once the session has events)"))
    t = Timeline(path=str(path.relative_to(Path(protocol_dir).resolve())))
    for n, record in sp.records(path):
        t.total = n
        if len(t.events) >= limit:
            continue
        t.events.append(_event(n, record))
    _, problem, t.ended = sp.verify_file(path)
    if problem is None and anchor is not None:
        problem = sp.check_anchor(path, *anchor)
        t.anchored = problem is None
    t.verified = problem is None
    if problem is not None:
        t.broken_line, t.problem = problem.line, problem.message
    return t


def _event(n: int, record: dict | None) -> dict[str, Any]:
    if record is None:
        return {"line": n, "seq": "", "time": "", "kind": "(unreadable line)", "actor": "",
                "address": "", "detail": "", "detail_html": ""}
    detail = _detail_text(record.get("detail"))
    return {"line": n, "seq": record.get("seq", ""),
            "time": str(record.get("time", "")).replace("T", " ").replace("Z", " UTC"),
            "at": _instant(record.get("time")),
            "kind": str(record.get("kind", "")), "actor": str(record.get("actor", "")),
            "address": str(record.get("address") or ""),
            "detail": detail, "detail_html": link_outside_urls(detail)}


def _load(ctx: Ctx, limit: int = MAX_TIMELINE):
    """The session of ``{id}`` (this tenant's only) and its timeline, read off the reactor."""
    protocol_dir = ctx.console.config.server.protocol_dir

    def with_timeline(found: tuple[dict[str, Any], str]):
        facts, tenant = found
        d = run_blocking(read_timeline, protocol_dir, tenant, facts["id"], facts["protocol_file"],
                         limit, facts["anchor"])
        return d.addCallback(lambda t: (facts, t))

    d = ctx.run(_session_and_tenant, ctx.session.tenant_id, ctx.params["id"])
    return d.addCallback(with_timeline)


@route("GET", "sessions/{id}")
def session_detail(ctx: Ctx):
    from .pages_recordings import link_times, recordings_of, with_split_flags
    d = _load(ctx)

    def with_recordings(found):
        def show(recs):
            link_times(found[1].events, recs)
            return ctx.page("sessions_detail.html", s=found[0], t=found[1], recordings=recs,
                            max_timeline=MAX_TIMELINE)
        d = ctx.run(recordings_of, ctx.session.tenant_id, found[0]["id"])
        d.addCallback(lambda recs: run_blocking(with_split_flags, ctx.console.config, recs))
        return d.addCallback(show)
    return d.addCallback(with_recordings)


PROTOCOL_CSV_HEADER = ["line", "seq", "time", "kind", "actor", "address", "detail",
                       "chain_verified"]


@route("GET", "sessions/{id}/protocol.csv")
def session_protocol_csv(ctx: Ctx):
    def export(found: tuple[dict[str, Any], Timeline]) -> bytes:
        facts, t = found
        if t.missing:
            raise PageError(404, t.missing)
        verdict = "yes" if t.verified else f"no: broken at line {t.broken_line}"
        body = csv_bytes(PROTOCOL_CSV_HEADER, [[
            e["line"], e["seq"], e["time"], e["kind"], e["actor"], e["address"], e["detail"],
            verdict] for e in t.events])
        return ctx.download(body, CSV_CONTENT_TYPE, f"protocol-{facts['id']}.csv")

    return _load(ctx, limit=10 ** 9).addCallback(export)
