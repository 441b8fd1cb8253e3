"""The writes that start and end a session, as group commits (``server.group_commit``).

Start (an ad-hoc join): the lock-out check, the supporter check and the ``sessions`` row in
**one** transaction, then the session's first protocol lines (``created``, ``joined``) — for
every join of the batch, in one pool job.  A join is answered only after its row is committed
and its lines are fsynced; a join whose lines fail is reported as such (the broker ends it and
refuses it); if the transaction fails, no row of the batch exists and every join fails.

End (the relay closed a session): the row read, the ``ended`` line and billing row written (and
fsynced), then the row's end **and** the line's anchor (seq and hash) in one transaction — one
pool job for every session that ended meanwhile.  The ``ended`` line is on disk before its
anchor; a crash in between leaves an unfinished row whose protocol already ends, which the
crash recovery finishes (``finish`` is idempotent) instead of a finished row whose protocol
never gets its end.

SQLAlchemy Core statements, not ORM objects: this path runs for every set-up, and the ORM's
identity map, lazy loads and unit of work cost more than the statements themselves.
Blocking functions: call them from the blocking pool (a ``GroupCommit``'s ``work``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from twisted.logger import Logger

from protocol import control
from protocol.session_end import EndCause, EndReason

from .db.models import Lockout, Role, Session, Tenant, User
from .pki import utcnow
from .session_protocol import SessionSummary

log = Logger()


@dataclass
class SessionStart:
    """One join of a batch: the row to insert and the protocol lines to write."""

    session_id: str
    supporter_name: str
    #: ``sessions`` columns besides id, tenant and times (kind, identities, addresses, ...)
    values: dict
    #: lock-out keys checked in the same transaction (empty: checked elsewhere)
    lockout_keys: tuple[str, ...]
    #: (kind, detail) lines the server writes as the session's first
    events: list[tuple[str, dict]]


@dataclass(frozen=True)
class LockedOut:
    """The outcome of a start refused by the lock-out: nothing was written."""

    wait: float


def _waits(session, keys: set[str], now: dt.datetime) -> dict[str, float]:
    """Seconds each locked key still has to wait (keys not locked are left out)."""
    if not keys:
        return {}
    found = session.execute(select(Lockout.key, Lockout.locked_until)
                            .where(Lockout.key.in_(sorted(keys))))
    return {key: (until - now).total_seconds() for key, until in found
            if until is not None and until > now}


def _supporters(session, names: set[str]) -> dict[str, tuple[bool, Role, str, int]]:
    """name -> (disabled, role, tenant name, tenant id): one statement for the batch."""
    rows = session.execute(select(User.name, User.disabled, User.role, Tenant.name, Tenant.id)
                           .join(Tenant, Tenant.id == User.tenant_id)
                           .where(User.name.in_(sorted(names))))
    return {name: (disabled, role, tenant, tenant_id)
            for name, disabled, role, tenant, tenant_id in rows}


def insert_starts(session, starts: list[SessionStart], now: dt.datetime | None = None
                  ) -> list[Any]:
    """In the caller's transaction (``session``: a Core connection or an ORM session): per start its tenant's name (row inserted), a ``LockedOut``
    or a ``control.Forbidden`` (nothing inserted for it)."""
    now = now or utcnow()
    waits = _waits(session, {k for s in starts for k in s.lockout_keys}, now)
    users = _supporters(session, {s.supporter_name for s in starts})
    outcomes: list[Any] = []
    rows = []
    for start in starts:
        wait = max([waits.get(k, 0.0) for k in start.lockout_keys], default=0.0)
        user = users.get(start.supporter_name)
        if wait > 0:
            outcomes.append(LockedOut(wait))
        elif user is None or user[0]:
            outcomes.append(control.Forbidden(f"user {start.supporter_name!r} is disabled or gone"))
        elif user[1] == Role.auditor:
            outcomes.append(control.Forbidden("auditors cannot start sessions"))
        else:
            outcomes.append(user[2])
            rows.append({**start.values, "id": start.session_id, "tenant_id": user[3],
                         "created_at": now, "started_at": now, "bytes_to_peer": 0,
                         "bytes_to_supporter": 0})
    if rows:
        session.execute(insert(Session.__table__), rows)
    return outcomes


def open_sessions(db, protocols, starts: list[SessionStart]) -> list[Any]:
    """The blocking work of a batch of starts: one transaction for the rows, then one group
    commit of the protocol lines.  Per start: its tenant's name (row committed, lines on disk),
    a ``LockedOut``, a ``control.Forbidden``, or the exception that kept its lines from disk
    (its row exists; the caller ends the session).  Raises if the transaction fails."""
    outcomes = db.call_core(insert_starts, starts)
    if protocols is None:
        return outcomes
    opened = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, str)]
    if not opened:
        return outcomes
    written = protocols.record_batch([
        (outcomes[i], starts[i].session_id,
         [(kind, "server", "", detail) for kind, detail in starts[i].events]) for i in opened],
        fresh=True)  # new session ids: their files go into this month's folder
    for i, result in zip(opened, written):
        if isinstance(result, Exception):
            outcomes[i] = ProtocolNotWritten(outcomes[i], result)
    return outcomes


class ProtocolNotWritten(Exception):
    """A start whose row was committed but whose first protocol lines are not on disk."""

    def __init__(self, tenant: str, cause: Exception) -> None:
        super().__init__(str(cause))
        self.tenant = tenant
        self.cause = cause


# --- end ----------------------------------------------------------------------------------------

def _utc(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def party_of(side: str, kind: str) -> str:
    """A relay side as the party a person knows: the peer of an ad-hoc session is the customer."""
    if side == "peer":
        return "customer" if kind == "adhoc" else "host"
    return side


def _detail_of(text: str, cause: str, by: str | None) -> str:
    head = EndReason(EndCause(cause), by or "server").text()
    return text[len(head) + 2:] if text.startswith(head + ": ") else ""


def final_end_reason(row: Any, stats: Any) -> EndReason:
    """The reason a session ended: the first one a party or the server reported (kept in the row
    while the session still ran), else what the relay saw."""
    if row.end_cause and row.ended_at is None:
        try:
            return EndReason(EndCause(row.end_cause), row.ended_by or "server",
                             _detail_of(row.end_reason or "", row.end_cause, row.ended_by))
        except ValueError:
            pass
    end = stats.end or EndReason(EndCause.ERROR, "relay", stats.end_reason[:120])
    return EndReason(end.cause, party_of(end.by, row.kind), end.detail)


_END_COLUMNS = (Session.id, Session.kind, Session.created_at, Session.started_at,
                Session.ended_at, Session.supporter_identity, Session.peer_identity,
                Session.peer_address, Session.end_reason, Session.end_cause, Session.ended_by,
                Session.protocol_end_hash, Tenant.name.label("tenant"))

# the table, not the mapped class: plain executemany statements, no ORM bulk bookkeeping
_SESSIONS = Session.__table__
_END_UPDATE = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("b_id"))
               .values(ended_at=bindparam("b_ended_at"), started_at=bindparam("b_started_at"),
                       bytes_to_peer=bindparam("b_to_peer"),
                       bytes_to_supporter=bindparam("b_to_supporter"),
                       end_reason=bindparam("b_reason"), end_cause=bindparam("b_cause"),
                       ended_by=bindparam("b_by")))
_ANCHOR_UPDATE = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("b_id"))
                  .values(protocol_file=bindparam("b_file"),
                          protocol_end_seq=bindparam("b_seq"),
                          protocol_end_hash=bindparam("b_hash")))


def end_sessions(session, protocols, ended: list[Any]) -> list[Any]:
    """In one transaction (``session``: a Core connection or an ORM session): read the rows of ended relay sessions (``SessionStats``), write their
    ``ended`` lines and billing rows (fsynced), then their ends and anchors.  Per session: its
    ``SessionSummary``, None (no row: nothing recorded), or the exception that kept its protocol
    from being closed (the row's end is written all the same, without an anchor)."""
    ids = [stats.session_id for stats in ended]
    rows = {row.id: row for row in session.execute(
        select(*_END_COLUMNS).outerjoin(Tenant, Tenant.id == Session.tenant_id)
        .where(Session.id.in_(ids)))}
    outcomes: list[Any] = []
    todo = []
    for stats in ended:
        row = rows.get(stats.session_id)
        if row is None:
            outcomes.append(None)
            continue
        end = final_end_reason(row, stats)
        ended_at = _utc(stats.ended_at)
        started_at = row.started_at or _utc(stats.started_at)
        summary = SessionSummary(
            session_id=row.id, kind=row.kind, started_at=started_at or row.created_at,
            ended_at=ended_at or utcnow(), supporter=row.supporter_identity,
            customer_or_host=row.peer_identity or (f"customer@{row.peer_address}"
                                                   if row.peer_address else None),
            bytes_to_peer=stats.bytes_supporter_to_peer,
            bytes_to_supporter=stats.bytes_peer_to_supporter, end_reason=end.text()[:200],
            end_cause=end.cause.value, ended_by=end.by)
        outcomes.append(summary)
        todo.append((len(outcomes) - 1, row, summary, end, ended_at, started_at))
    if not todo:
        return outcomes
    closed: list[Any] = [None] * len(todo)
    if protocols is not None:
        closed = protocols.ended_batch([(row.tenant or "default", summary, None)
                                        for _, row, summary, *_ in todo])
    session.execute(_END_UPDATE, [
        {"b_id": row.id, "b_ended_at": ended_at, "b_started_at": started_at,
         "b_to_peer": summary.bytes_to_peer, "b_to_supporter": summary.bytes_to_supporter,
         "b_reason": summary.end_reason, "b_cause": summary.end_cause, "b_by": summary.ended_by}
        for _, row, summary, _end, ended_at, started_at in todo])
    anchors = []
    for (index, row, *_), result in zip(todo, closed):
        if isinstance(result, Exception):
            outcomes[index] = result
        elif result is not None and row.protocol_end_hash is None:
            record, path = result
            anchors.append({"b_id": row.id, "b_file": path, "b_seq": record["seq"],
                            "b_hash": record["hash"]})
    if anchors:
        session.execute(_ANCHOR_UPDATE, anchors)
    return outcomes


def close_sessions(db, protocols, ended: list[Any]) -> list[Any]:
    """The blocking work of a batch of relay session ends (``end_sessions`` in one transaction)."""
    return db.call_core(end_sessions, protocols, ended)


__all__ = ["SessionStart", "LockedOut", "ProtocolNotWritten", "insert_starts", "open_sessions",
           "end_sessions", "close_sessions", "final_end_reason", "party_of"]
