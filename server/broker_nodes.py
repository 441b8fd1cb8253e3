"""The broker's part with several server nodes on one database (``server.cluster``).

A session is set up by the node its supporter is connected to.  Its other party (a host, or an
ad-hoc customer) may be connected to another node: there it is a ``RemoteParty``, and the node
bus carries what the broker would do on that party's control connection — the session offer
(``offer``), the party's reports back to the session's node (``event``), the notice that the
session ended (``notice``), a customer taking a nameplate of another node's supporter (``join``),
host presence for the supporters' lists (``presence``).  Nameplates are rows (unique and single
use across nodes).  Session bytes never pass here: both parties open their relay legs to the
relay process their tickets name.

``NodeCalls`` is a mixin of ``server.broker.Broker``; with one node (``bus`` None) none of this
runs.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer
from twisted.logger import Logger

from protocol import control
from protocol.identity import Identity

from .cluster import NodeCallFailed
from .db.models import Host, NameplateRow

log = Logger()

NAMEPLATE_DIGITS = 4

#: presence changes go to the other nodes in batches
PRESENCE_BATCH_SECONDS = 0.25
PRESENCE_PER_MESSAGE = 50


class RemoteParty:
    """A party whose control connection another server node holds (``server.cluster``): what
    the broker would call on the connection goes to that node over the node bus."""

    def __init__(self, broker: "NodeCalls", node: str, identity: Identity | None, address: str,
                 fingerprint: str = "", serial: str | None = None) -> None:
        self.broker = broker
        self.node = node
        self.identity = identity
        self.address = address
        self.fingerprint = fingerprint
        self.serial = serial
        self.module_version = ""
        self.session_id = ""

    def callRemote(self, command, **kwargs) -> defer.Deferred:
        if command is control.SessionEnded:
            return self.broker.bus.tell(self.node, "notice", {
                "session_id": kwargs.get("session_id", self.session_id), "fields": kwargs})
        return defer.fail(control.WrongState(f"{command.__name__} cannot reach a party on "
                                             f"node {self.node}"))

    def abort(self, reason: str) -> None:
        log.warn("a party on node {node} would be closed: {reason}", node=self.node,
                 reason=reason)


class NodeCalls:
    """What a ``Broker`` does with and for the other nodes (attributes are the broker's)."""

    node: str | None
    bus: Any
    live_nodes: set[str]
    remote_parties: dict[str, tuple[str, Any]]

    def attach_bus(self, bus) -> None:
        """Several nodes: answer the other nodes' calls for parties connected here."""
        self.bus = bus
        bus.handlers.update({"offer": self._remote_offer, "event": self._remote_event,
                             "join": self._remote_join, "presence": self._remote_presence,
                             "notice": self._remote_notice, "forget": self._remote_forget,
                             "drop_host": self._remote_drop_host})

    def reserve_nameplate(self, supporter) -> defer.Deferred:
        """``allocate_nameplate`` as a Deferred; with several nodes the nameplate is unique
        among the live ones of every node (a ``nameplates`` row)."""
        if self.bus is None:
            return defer.maybeDeferred(self.allocate_nameplate, supporter)
        return self._allocate_shared(supporter)

    @defer.inlineCallbacks
    def _allocate_shared(self, supporter):
        self.check_recordable()
        for _attempt in range(50):
            code = f"{secrets.randbelow(10 ** NAMEPLATE_DIGITS):0{NAMEPLATE_DIGITS}d}"
            if code in self.nameplates:
                continue
            claimed = yield self.db.run(
                _claim_nameplate, code, self.node, supporter.identity.uri, self.now(),
                self.nameplate_ttl, 10 ** NAMEPLATE_DIGITS // 2)
            if claimed is None:
                break
            if claimed:
                return self._hold_nameplate(code, supporter)
        raise control.WrongState("no free ad-hoc ID right now; try again in a minute")

    @defer.inlineCallbacks
    def _join_elsewhere(self, owner: str, customer, nameplate: str):
        """The nameplate belongs to a supporter on node ``owner``: the session is set up there,
        this node carries the customer's reports to it."""
        try:
            answer = yield self.bus.call(owner, "join", {"nameplate": nameplate,
                                                         "address": customer.address})
        except NodeCallFailed as exc:
            if exc.code == control.UnknownNameplate.code.decode():  # a wrong ID counts here too
                yield self.db.run(self.lockouts.failed, [f"adhoc-addr:{customer.address}"])
            raise self._as_control_error(exc, owner)
        self.remote_parties[answer["session_id"]] = (owner, customer)
        log.info("customer {address} joined nameplate {nameplate} of node {node}: session "
                 "{session_id}", address=customer.address, nameplate=nameplate, node=owner,
                 session_id=answer["session_id"])
        return answer

    @defer.inlineCallbacks
    def _remote_join(self, sender: str, body: dict):
        """A customer on node ``sender`` took one of this node's nameplates (its row)."""
        code = str(body.get("nameplate", ""))
        plate = self.nameplates.pop(code, None)
        if plate is None or plate.expires_at <= self.reactor.seconds():
            raise control.UnknownNameplate("this ID is unknown or expired: check the 8 digits "
                                           "with your supporter")
        customer = RemoteParty(self, sender, None, str(body.get("address", "")))
        answer = yield self._join_here(customer, plate)
        customer.session_id = answer["session_id"]
        return answer

    def _tell_forget(self, live) -> None:
        if isinstance(live.peer, RemoteParty):
            self.bus.tell(live.peer.node, "forget", {"session_id": live.session_id})

    def _forward_event(self, owner: str, session_id: str, kind: str,
                       detail: dict) -> defer.Deferred:
        """A report of a party connected here, for the node that set its session up."""

        def refused(failure):
            failure.trap(NodeCallFailed)
            raise self._as_control_error(failure.value, owner)
        return self.bus.call(owner, "event", {"session_id": session_id, "kind": kind,
                                              "detail": detail}).addErrback(refused)

    @staticmethod
    def _as_control_error(exc, node: str) -> control.ControlError:
        """Another node's refusal as the control error a module understands."""
        code = exc.code.encode("ascii", "replace")
        for cls in control.ALL_ERRORS:
            if cls.code == code:
                return cls(exc.message)
        return control.WrongState(f"server node {node} did not answer in time or failed: "
                                  f"{exc.message}")

    def _remote_event(self, sender: str, body: dict) -> defer.Deferred:
        live = self.sessions.get(body.get("session_id", ""))
        if live is None or not isinstance(live.peer, RemoteParty) or live.peer.node != sender:
            raise control.Forbidden("you are not a party of this session")
        detail = body.get("detail")
        if not isinstance(detail, dict):
            raise control.WrongState("the event's detail must be an object")
        return defer.maybeDeferred(self.session_event, live.peer, live.session_id,
                                   str(body.get("kind", "")), detail)

    @defer.inlineCallbacks
    def _remote_offer(self, sender: str, body: dict):
        """Node ``sender`` set a session up with a host connected here: offer it to the host."""
        presence = self.hosts.get(body.get("host_id", ""))
        if presence is None:
            raise control.HostOffline("the host is not connected to this node")
        conn, session_id = presence.connection, body["session_id"]
        self.remote_parties[session_id] = (sender, conn)
        try:
            answer = yield conn.callRemote(
                control.OfferSession, supporter=body["supporter"],
                supporter_fingerprint=body["supporter_fingerprint"],
                **{k: body[k] for k in ("session_id", "relay_host", "relay_port", "relay_token")},
                relay_idle_seconds=body.get("relay_idle_seconds"))
        except Exception:
            self.remote_parties.pop(session_id, None)
            raise
        if not answer["accepted"]:
            self.remote_parties.pop(session_id, None)
        log.info("offered session {session_id} of node {node} to host {host_id}: {answer}",
                 session_id=session_id, node=sender, host_id=presence.host_id,
                 answer="accepted" if answer["accepted"] else "declined")
        return {"accepted": bool(answer["accepted"]), "address": conn.address,
                "fingerprint": conn.fingerprint or "", "serial": conn.serial or ""}

    def _remote_notice(self, sender: str, body: dict) -> None:
        session_id = body.get("session_id", "")
        remote = self.remote_parties.pop(session_id, None)
        if remote is None or remote[0] != sender:
            return
        try:
            remote[1].callRemote(control.SessionEnded, **body["fields"])
        except Exception as exc:
            log.debug("could not tell a party that session {session_id} ended: {why}",
                      session_id=session_id, why=str(exc))

    def _remote_forget(self, sender: str, body: dict) -> None:
        remote = self.remote_parties.get(body.get("session_id", ""))
        if remote is not None and remote[0] == sender:
            del self.remote_parties[body["session_id"]]

    def _remote_drop_host(self, sender: str, body: dict) -> None:
        presence = self.hosts.get(body.get("host_id", ""))
        if presence is not None:
            presence.connection.abort(f"the host connected again to node {sender}")

    def _online_elsewhere(self, host: Host) -> bool:
        """Several nodes: the host's control connection is held by another live node."""
        return (self.bus is not None and bool(host.online) and host.node is not None
                and host.node != self.node and host.node in self.live_nodes)

    def _send_presence(self) -> None:
        batch, self._presence_out = self._presence_out, []
        for start in range(0, len(batch), PRESENCE_PER_MESSAGE):
            self.bus.broadcast("presence", {"hosts": batch[start:start + PRESENCE_PER_MESSAGE]})

    def _remote_presence(self, sender: str, body: dict) -> None:
        for entry in body.get("hosts", []):
            try:
                host_id, online, seen, address = entry
            except (TypeError, ValueError):
                continue
            self.push_presence(str(host_id), bool(online), str(seen), str(address))


# --- database work (runs in the blocking pool) -------------------------------------------------

def _claim_nameplate(session, code: str, node: str, supporter: str, now, ttl: float,
                     limit: int) -> bool | None:
    """Take ``code`` for this node's supporter: True, False (live elsewhere), None (full)."""
    session.execute(delete(NameplateRow).where(NameplateRow.expires_at <= now))
    if session.scalar(select(func.count()).select_from(NameplateRow)) >= limit:
        return None
    try:
        with session.begin_nested():
            session.add(NameplateRow(code=code, node=node, supporter=supporter,
                                     expires_at=now + dt.timedelta(seconds=ttl)))
    except IntegrityError:
        return False
    return True


def _take_nameplate(session, code: str, now) -> str | None:
    """Single use across nodes: the node whose supporter holds the live ``code``, and the row
    is gone; None if there is no such live nameplate."""
    row = session.get(NameplateRow, code, with_for_update=True)
    if row is None:
        return None
    node, live = row.node, row.expires_at > now
    session.execute(delete(NameplateRow).where(NameplateRow.code == code))
    return node if live else None


def _drop_nameplates(session, codes: list[str], node: str) -> None:
    session.execute(delete(NameplateRow).where(NameplateRow.code.in_(codes),
                                               NameplateRow.node == node))


__all__ = ["NodeCalls", "RemoteParty", "PRESENCE_BATCH_SECONDS"]
