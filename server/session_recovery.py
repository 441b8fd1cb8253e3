"""Start-up: end the sessions a crash cut off.

A server killed mid-session (``kill -9``, power loss) leaves ``sessions`` rows without an end and
protocol files without their ``ended`` line.  At start-up, before the module port listens, every
such session that no running relay process still carries is ended: reason "server stopped
unexpectedly", an ``ended`` line appended to its protocol (the chain goes on from the last whole
line), the billing row written, and the line's hash anchored in the database — so ``session list``,
``protocol verify`` and the console tell the truth.  Blocking: run at start-up or off the reactor.

Separate relay processes keep running while the server restarts; each lists its live sessions in
``relay-<pid>.json`` in the data folder (and, with several nodes, in its ``server_nodes`` row),
and those sessions are left alone (the relay records their end itself).

Several nodes on one database (``server.cluster``): a node recovers at start-up only the sessions
it set up itself (``sessions.node``); the sessions of a node that stopped heartbeating while the
others live are ended by ``DeadNodeSweeper`` on a live node — only those no relay carries and
older than the pair timeout (a session on a relay ends by the relay, with its real reason), each
once (the rows are locked while they are ended).  The dead node's hosts are marked offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datetime as dt

from sqlalchemy import or_, select, update
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from protocol.session_end import EndCause, EndReason

from .db import Database
from .db.models import Host, Session, Tenant
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


def _unfinished(session, keep: set[str], node: str | None = None,
                cluster_timeout: float | None = None) -> list[tuple[str, SessionSummary]]:
    """End the unfinished sessions set up by ``node`` (one node: all) that no relay carries."""
    end = EndReason(EndCause.SERVER_CRASHED, "server")
    found = []
    query = select(Session).where(Session.ended_at.is_(None))
    if node is not None:
        query = query.where(or_(Session.node == node, Session.node.is_(None)))
    if cluster_timeout is not None:
        from .cluster import sessions_on_live_relays as listed_by_relays
        keep = keep | listed_by_relays(session, cluster_timeout)
    rows = session.scalars(query.with_for_update(skip_locked=True)).all()
    for row in rows:
        if row.id in keep:
            continue
        row.ended_at = utcnow()
        row.end_reason = end.text()
        row.end_cause, row.ended_by = end.cause.value, end.by
        tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
        found.append((tenant.name if tenant else "default", SessionSummary.from_row(row)))
    return found


def anchor_protocol(session, session_id: str, path: str | None, ended: dict) -> None:
    """The session's protocol file and its ``ended`` line as the anchor of the file's hash
    chain (a file cut after its end is then caught by ``protocol verify``)."""
    row = session.get(Session, session_id)
    if row is None:
        return
    if path:
        row.protocol_file = path
    if row.protocol_end_hash is None:
        row.protocol_end_seq, row.protocol_end_hash = ended["seq"], ended["hash"]


def recover(db: Database, protocols: SessionProtocols | None, data_dir: Path,
            node: str | None = None, cluster_timeout: float | None = None) -> list[str]:
    """End every unfinished session (of ``node``, with several nodes) no running relay carries;
    returns their ids."""
    keep = sessions_on_live_relays(data_dir)
    cut_off = db.call(_unfinished, keep, node, cluster_timeout)
    _close_protocols(db, protocols, cut_off)
    return [summary.session_id for _, summary in cut_off]


def _close_protocols(db: Database, protocols: SessionProtocols | None,
                     cut_off: list[tuple[str, SessionSummary]]) -> None:
    for tenant, summary in cut_off:
        log.warn("session {session_id} was cut off when its server node stopped unexpectedly: "
                 "recording its end", session_id=summary.session_id)
        if protocols is None:
            continue
        try:
            ended = protocols.ended(tenant, summary, "server")
            db.call(anchor_protocol, summary.session_id, protocols.file_of(tenant, summary.session_id),
                    ended)
        except Exception:
            log.failure("could not close the protocol of session {session_id}",
                        session_id=summary.session_id)


def _of_dead_nodes(session, me: str, node_timeout: float,
                   grace: float) -> tuple[set[str], list[tuple[str, SessionSummary]]]:
    """The live nodes now, and the sessions of dead ones this call ended (see the module)."""
    from .cluster import live_nodes, sessions_on_live_relays as listed_by_relays
    alive = live_nodes(session, node_timeout) | {me}
    orphaned = Host.online.is_(True), Host.node.is_not(None), Host.node.not_in(alive)
    offline = list(session.scalars(select(Host.id).where(*orphaned)))
    if offline:
        session.execute(update(Host).where(*orphaned).values(online=False))
    keep = listed_by_relays(session, node_timeout)
    before = utcnow() - dt.timedelta(seconds=grace)
    end = EndReason(EndCause.SERVER_CRASHED, "server", "its server node stopped")
    rows = session.scalars(select(Session).where(
        Session.ended_at.is_(None), Session.node.is_not(None), Session.node.not_in(alive),
        Session.created_at < before).with_for_update(skip_locked=True)).all()
    found = []
    for row in rows:
        if row.id in keep:
            continue
        row.ended_at = utcnow()
        row.end_reason = end.text()[:200]
        row.end_cause, row.ended_by = end.cause.value, end.by
        tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
        found.append((tenant.name if tenant else "default", SessionSummary.from_row(row)))
    return alive, found, offline


class DeadNodeSweeper(service.Service):
    """Several nodes: every third of the node timeout, learn which nodes live (the broker offers
    sessions through them) and end what dead ones left open."""

    def __init__(self, db: Database, protocols: SessionProtocols | None, broker, me: str,
                 node_timeout: float, grace: float, reactor) -> None:
        self.db, self.protocols, self.broker, self.me = db, protocols, broker, me
        self.node_timeout, self.grace, self.reactor = node_timeout, grace, reactor
        self._loop: task.LoopingCall | None = None

    @defer.inlineCallbacks
    def sweep(self):
        try:
            alive, cut_off, offline = yield self.db.run(_of_dead_nodes, self.me,
                                                        self.node_timeout, self.grace)
        except Exception:
            log.failure("could not look for dead server nodes")
            return
        gone = self.broker.live_nodes - alive
        if gone:
            log.warn("server node(s) {nodes} stopped heartbeating: their hosts are offline "
                     "until they connect to a live node", nodes=", ".join(sorted(gone)))
        self.broker.live_nodes = alive
        seen = utcnow().isoformat()
        for host_id in offline:  # the supporters here whose list shows them
            self.broker.push_presence(host_id, False, seen, "")
        for session_id, (node, _party) in list(self.broker.remote_parties.items()):
            if node not in alive:  # its reports have nowhere to go any more
                del self.broker.remote_parties[session_id]
        if cut_off:
            from protocol.runtime import run_blocking
            yield run_blocking(_close_protocols, self.db, self.protocols, cut_off)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = self.reactor
        self._loop.start(max(0.5, self.node_timeout / 3), now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


__all__ = ["DeadNodeSweeper", "recover", "sessions_on_live_relays"]
