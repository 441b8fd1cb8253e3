"""Start-up: end the sessions a crash cut off.

A server killed mid-session (``kill -9``, power loss) leaves ``sessions`` rows without an end and
protocol files without their ``ended`` line.  At start-up, before the module port listens, every
such session that no running relay process still carries is ended: reason "server stopped
unexpectedly", an ``ended`` line appended to its protocol (the chain goes on from the last whole
line), the billing row written, and the line's hash anchored in the database — so ``session list``,
``protocol verify`` and the console tell the truth.  Blocking: run at start-up or off the reactor.

Separate relay processes keep running while the server restarts; each lists its live sessions in
``relay-<pid>.json`` in the data folder, and those sessions are left alone (the relay records
their end itself).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlalchemy import select
from twisted.logger import Logger

from protocol.session_end import EndCause, EndReason

from .db import Database
from .db.models import Session, Tenant
from .pki import utcnow
from .session_protocol import SessionProtocols, SessionSummary

log = Logger()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sessions_on_live_relays(data_dir: Path) -> set[str]:
    """Session ids that running relay processes (``relay-<pid>.json``) say they carry."""
    live: set[str] = set()
    for path in Path(data_dir).glob("relay-*.json"):
        try:
            state = json.loads(path.read_text())
            pid = int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid != os.getpid() and _alive(pid):
            live.update(str(s) for s in state.get("sessions", []) if isinstance(s, str))
    return live


def _unfinished(session, keep: set[str]) -> list[tuple[str, SessionSummary]]:
    end = EndReason(EndCause.SERVER_CRASHED, "server")
    found = []
    rows = session.scalars(select(Session).where(Session.ended_at.is_(None))).all()
    for row in rows:
        if row.id in keep:
            continue
        row.ended_at = utcnow()
        row.end_reason = end.text()
        row.end_cause, row.ended_by = end.cause.value, end.by
        tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
        found.append((tenant.name if tenant else "default", SessionSummary.from_row(row)))
    return found


def _anchor(session, session_id: str, path: str | None, ended: dict) -> None:
    row = session.get(Session, session_id)
    if row is None:
        return
    if path:
        row.protocol_file = path
    if row.protocol_end_hash is None:
        row.protocol_end_seq, row.protocol_end_hash = ended["seq"], ended["hash"]


def recover(db: Database, protocols: SessionProtocols | None, data_dir: Path) -> list[str]:
    """End every unfinished session no running relay carries; returns their ids."""
    keep = sessions_on_live_relays(data_dir)
    cut_off = db.call(_unfinished, keep)
    for tenant, summary in cut_off:
        log.warn("session {session_id} was cut off when the server stopped unexpectedly: "
                 "recording its end", session_id=summary.session_id)
        if protocols is None:
            continue
        try:
            ended = protocols.ended(tenant, summary, "server")
            db.call(_anchor, summary.session_id, protocols.file_of(tenant, summary.session_id),
                    ended)
        except Exception:
            log.failure("could not close the protocol of session {session_id}",
                        session_id=summary.session_id)
    return [summary.session_id for _, summary in cut_off]


__all__ = ["recover", "sessions_on_live_relays"]
