"""Recordings with several server nodes (``server.cluster``): a recording stored by one node for a
session another node set up.

A recording module uploads over its own control connection, so the node it is connected to
stores the upload (every node reaches the same recordings: a shared folder or S3).  The node that
set the session up writes the session's protocol and runs the ``required`` watchdog.  Between
them, over the node bus (never recording or session bytes):

- ``rec_line``: the storing node's lines for the session's protocol, ``recording_started`` and the
  final ``recording`` line with the file's SHA-256; the session's node writes them into the hash
  chain and answers once they are on disk (a call: the storing node goes on only then, so the
  lines keep their order, and a line that cannot be written refuses the recording);
- ``rec_alive``: the upload moves (at most every ``alive_seconds``), so the session's node sees a
  stall as it would see one of its own uploads;
- ``rec_failed``: storage failed, the quota is used up, or the recording could not start under
  ``required``: the session's node ends the session with that reason (both parties told);
- ``rec_moved``: the recorder came back on another node (``RecordingResume``): a node still
  holding the upload lets it go.

The session's node takes these only from the bus, only those two line kinds, and lines only for
sessions it set up.  If that node died meanwhile (no answer, not live any more), the storing node
writes the final line itself, as the relay process and the dead-node sweep write into protocols of
sessions they did not set up (appends are serialised by ``flock`` on the shared folder).  If the
storing node died and the recorder does not come back to any node within ``resume_seconds``,
the session's node closes the upload (``take_over_orphans``), as a restarted node closes its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from twisted.internet import defer, task
from twisted.logger import Logger

from protocol import control

from ..cluster import NodeCallFailed, live_nodes
from ..db.models import Session, Tenant

log = Logger()

#: the protocol lines another node may ask this one to write
LINE_KINDS = frozenset({"recording_started", "recording"})


@dataclass
class RemoteUpload:
    """At the session's node: an upload another node stores for one of its sessions (what the
    watchdog needs of it)."""

    id: str
    session_id: str
    party: str
    node: str
    last_chunk: float
    ended: bool = False


class RecordingNodeCalls:
    """What a ``RecordingReceiver`` does with and for the other nodes (attributes are the
    receiver's; with one node, ``bus`` None, none of this runs)."""

    bus: Any
    node: str | None
    remote: dict[str, RemoteUpload]

    def attach_bus(self, bus) -> None:
        self.bus = bus
        bus.handlers.update({"rec_line": self._remote_line, "rec_alive": self._remote_alive,
                             "rec_failed": self._remote_failed, "rec_moved": self._remote_moved})

    @property
    def alive_seconds(self) -> float:
        return min(1.0, self.stall_seconds / 4)

    def elsewhere(self, session_node: str | None) -> bool:
        """The session's protocol is written by another node."""
        return self.bus is not None and session_node is not None and session_node != self.node

    # --- the storing node -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def line(self, session_id: str, tenant: str, session_node: str | None, kind: str,
             detail: dict):
        """A line for the session's protocol, written here or by the session's node; fails if it
        cannot be written."""
        if not self.elsewhere(session_node):
            yield self.broker.server_line(session_id, tenant, kind, detail)
            return None
        body = {"session_id": session_id, "tenant": tenant, "kind": kind, "detail": detail}
        timeout = self.config.cluster.node_timeout_seconds
        deadline = self.reactor.seconds() + 2 * timeout + self.config.cluster.call_timeout_seconds
        while True:
            try:
                yield self.bus.call(session_node, "rec_line", body)
                return None
            except NodeCallFailed as exc:
                if exc.code not in ("timeout", "unreachable"):
                    raise
                alive = yield self.db.run(live_nodes, timeout)
                if session_node not in alive:  # it died: write it as the dead-node sweep would
                    log.warn("session {session_id}: its node {node} is gone; the {kind} line is "
                             "written here", session_id=session_id, node=session_node, kind=kind)
                    yield self.broker.server_line(session_id, tenant, kind, detail)
                    return None
                if self.reactor.seconds() >= deadline:
                    raise
                yield task.deferLater(self.reactor, 0.5, lambda: None)

    def tell_alive(self, upload, force: bool = False) -> None:
        if not self.elsewhere(upload.session_node):
            return
        now = self.reactor.seconds()
        if not force and now - upload.told_at < self.alive_seconds:
            return
        upload.told_at = now
        self.bus.tell(upload.session_node, "rec_alive", {
            "session_id": upload.session_id, "recording_id": upload.id, "party": upload.party})

    def end_elsewhere(self, session_id: str, session_node: str, why: str) -> defer.Deferred:
        """Ask the session's node to end it (``recording_failed``, both parties told)."""
        log.error("session {session_id} (node {node}) must end: {why} (recording policy "
                  "'required')", session_id=session_id, node=session_node, why=why)
        return self.bus.call(session_node, "rec_failed", {
            "session_id": session_id, "why": why[:160]}).addErrback(
            lambda f: log.warn("could not ask node {node} to end session {session_id}: {why}",
                               node=session_node, session_id=session_id,
                               why=f.getErrorMessage()))

    def tell_moved(self, recording_id: str) -> None:
        if self.bus is not None:
            self.bus.broadcast("rec_moved", {"recording_id": recording_id})

    # --- the session's node -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _remote_line(self, sender: str, body: dict):
        session_id, kind, detail = body.get("session_id"), body.get("kind"), body.get("detail")
        if kind not in LINE_KINDS:
            raise control.Forbidden(f"another node may not write {kind!r} lines")
        if not isinstance(session_id, str) or not isinstance(detail, dict) \
                or not isinstance(detail.get("recording_id"), str):
            raise control.WrongState("a recording line names its session and recording")
        recording_id = detail["recording_id"]
        live = self.broker.sessions.get(session_id)
        if kind == "recording_started":
            if live is None:
                raise control.Forbidden("the session is not live on this node")
            tenant = live.tenant
        else:  # the final line: also after the session ended here
            entry = self.remote.get(recording_id)
            if entry is not None:
                entry.ended = True
            if live is not None:
                tenant = live.tenant
            else:
                owner = yield self.db.run(_session_owner, session_id)
                if owner is None or owner[0] != self.node:
                    raise control.Forbidden("this node did not set that session up")
                tenant = owner[1]
        yield self.broker.server_line(session_id, tenant, kind, detail)
        if kind == "recording_started":  # watched from now on (a refused start is not)
            self.remote[recording_id] = RemoteUpload(recording_id, session_id,
                                                     str(detail.get("party", "")), sender,
                                                     self.reactor.seconds())
        log.info("session {session_id}: {kind} line of recording {rid} from node {node}",
                 session_id=session_id, kind=kind, rid=recording_id, node=sender)
        return {}

    def _remote_alive(self, sender: str, body: dict) -> None:
        session_id, recording_id = body.get("session_id"), body.get("recording_id")
        if not isinstance(recording_id, str):
            return
        entry = self.remote.get(recording_id)
        if entry is None and session_id in self.broker.sessions:
            # resumed on another node after this one restarted: known again
            entry = self.remote[recording_id] = RemoteUpload(
                recording_id, session_id, str(body.get("party", "")), sender, 0.0)
        if entry is not None and entry.session_id == session_id:  # also after the end
            entry.node, entry.last_chunk = sender, self.reactor.seconds()

    def _remote_failed(self, sender: str, body: dict):
        """Answered once the reason is in the session's row: the storing node refuses the
        recorder only then, so the relay records this reason, not the closing leg."""
        session_id = body.get("session_id")
        live = self.broker.sessions.get(session_id) if isinstance(session_id, str) else None
        if live is None or live.end is not None:
            return {}
        return self._end(session_id, f"{body.get('why', '')}"[:160] + f" (node {sender})"
                         ).addCallback(lambda _: {})

    def _remote_moved(self, sender: str, body: dict) -> None:
        upload = self.uploads.get(body.get("recording_id", ""))
        if upload is not None and upload.owner_gone and not upload.ended:
            log.info("recording {rid}: its recorder went on at node {node}; this node lets it go",
                     rid=upload.id, node=sender)
            self.uploads.pop(upload.id, None)

    def remote_of(self, session_id: str) -> list[RemoteUpload]:
        return [r for r in self.remote.values() if r.session_id == session_id]

    def forget_remote(self) -> None:
        """Entries whose final line came (or that this node closed itself)."""
        for recording_id, entry in list(self.remote.items()):
            if entry.ended:
                del self.remote[recording_id]

    def take_over_orphans(self, now: float) -> None:
        """Uploads another node stored for this node's sessions whose node is dead and whose
        recorder did not come back (to any node) within ``resume_seconds``: this node closes
        them, kept to their last whole record, incomplete, their hash in the protocol."""
        if not self.broker.live_nodes:  # not looked yet
            return
        for entry in list(self.remote.values()):
            if (entry.ended or entry.node in self.broker.live_nodes or entry.id in self.uploads
                    or now - entry.last_chunk <= self.resume_seconds):
                continue
            entry.ended = True
            self.take_over(entry).addErrback(
                lambda f: log.failure("could not close a recording a dead node left open", f))


def _session_owner(session, session_id: str) -> tuple[str | None, str] | None:
    """(the node that set the session up, its tenant's name)."""
    row = session.get(Session, session_id)
    if row is None:
        return None
    tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
    return row.node, tenant.name if tenant else "default"


def session_facts(session, session_id: str) -> dict | None:
    """What a node storing a recording for another node's session needs of it."""
    row = session.scalar(select(Session).where(Session.id == session_id))
    if row is None:
        return None
    tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
    return {"kind": row.kind, "node": row.node, "tenant": tenant.name if tenant else "default"}


__all__ = ["RecordingNodeCalls", "RemoteUpload", "LINE_KINDS", "session_facts"]
