"""Several server nodes on one PostgreSQL: who is alive, who runs the single jobs, and how nodes
call each other.

- ``NodeRegistry``: this node's row in ``server_nodes`` (``seen_at`` refreshed every third of
  ``cluster.node_timeout_seconds``); a node not seen for that long is dead.
- ``SingleRunner``: a PostgreSQL advisory lock held on its own connection, so exactly one node
  runs a job such as the mail outbox; a node that dies drops its connection and with it the lock.
  On SQLite (one node) the caller is always the runner.
- ``NodeBus``: ``LISTEN hausmeister_<node>`` on a dedicated connection in a dedicated thread (it
  blocks in ``notifies()``; the reactor's pool is not held), ``pg_notify`` to send.  A message is
  a JSON object; ``call`` sends one and waits for the answer (``reply``) with a timeout.  It
  carries control-plane calls between nodes (a session offer to a host on another node, a party's
  report to the node that set its session up), never session bytes.

Not here: what the calls do (``server.broker``), ending a dead node's sessions
(``server.session_recovery``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import threading
from typing import Any, Callable

from sqlalchemy import delete, select, text
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .db import Database
from .db.models import ServerNode
from .pki import utcnow

log = Logger()

#: PostgreSQL refuses NOTIFY payloads of 8000 bytes and more
MAX_MESSAGE_BYTES = 7900
#: advisory lock keys (one int8 each); the number spells "HMOUTBOX" loosely
OUTBOX_LOCK = 0x484D4F5554424F58


#: the channel every node listens on besides its own (``NodeBus.broadcast``)
ALL_NODES = "hausmeister__all"


def channel_of(node: str) -> str:
    """The node's channel, exactly its name (LISTEN quotes it): node-a and node_a differ."""
    return "hausmeister_" + node


class NodeCallFailed(Exception):
    """Another node answered a call with an error, did not answer in time, or is gone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- who is alive ------------------------------------------------------------------------------

def _register(session, name: str, kind: str, pid: int, moment: dt.datetime) -> None:
    row = session.get(ServerNode, name)
    if row is None:
        session.add(ServerNode(name=name, kind=kind, pid=pid, started_at=moment, seen_at=moment,
                               sessions=""))
    else:
        row.kind, row.pid, row.started_at, row.seen_at = kind, pid, moment, moment


def _seen(session, name: str, moment: dt.datetime, sessions: list[str] | None = None) -> None:
    row = session.get(ServerNode, name)
    if row is None:  # a sweeper took it for dead (we were paused too long): back again
        session.add(ServerNode(name=name, kind="relay" if sessions is not None else "server",
                               pid=os.getpid(), started_at=moment, seen_at=moment, sessions=""))
        row = session.get(ServerNode, name)
    row.seen_at = moment
    if sessions is not None:
        row.sessions = "\n".join(sessions)


def _leave(session, name: str) -> None:
    session.execute(delete(ServerNode).where(ServerNode.name == name))


def live_nodes(session, timeout: float, now: dt.datetime | None = None) -> set[str]:
    """Names of the server nodes seen within ``timeout`` seconds."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=timeout)
    return set(session.scalars(select(ServerNode.name).where(
        ServerNode.kind == "server", ServerNode.seen_at >= cutoff)))


def sessions_on_live_relays(session, timeout: float) -> set[str]:
    """Session ids that relay processes seen within ``timeout`` seconds say they carry."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout)
    found: set[str] = set()
    for listed in session.scalars(select(ServerNode.sessions).where(
            ServerNode.kind == "relay", ServerNode.seen_at >= cutoff)):
        found.update(s for s in (listed or "").split("\n") if s)
    return found


def claim_dead(session, timeout: float) -> list[str]:
    """Server nodes not seen within ``timeout`` seconds, removed from the registry by this call
    (one live node wins each dead one, so its sessions are ended once, not by every node)."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout)
    rows = session.execute(select(ServerNode.name, ServerNode.kind).where(
        ServerNode.seen_at < cutoff).with_for_update(skip_locked=True)).all()
    if rows:
        session.execute(delete(ServerNode).where(ServerNode.name.in_([n for n, _ in rows])))
    return [name for name, kind in rows if kind == "server"]


class NodeRegistry(service.Service):
    """This node's row in ``server_nodes``, refreshed while it runs and removed at a clean stop.
    ``sessions``: for a relay process, a callable listing the sessions it carries."""

    def __init__(self, db: Database, name: str, kind: str, timeout: float, reactor,
                 sessions: Callable[[], list[str]] | None = None) -> None:
        self.db, self.name, self.kind, self.timeout = db, name, kind, timeout
        self.reactor = reactor
        self.sessions = sessions
        self._loop: task.LoopingCall | None = None

    def register_now(self) -> None:
        """Blocking, at start-up: the node is known before it listens."""
        self.db.call(_register, self.name, self.kind, os.getpid(), utcnow())

    def beat(self) -> defer.Deferred:
        listed = self.sessions() if self.sessions is not None else None
        return self.db.run(_seen, self.name, utcnow(), listed).addErrback(
            lambda f: log.failure("could not refresh this node's registry row", f))

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = self.reactor
        self._loop.start(max(0.5, self.timeout / 3), now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.db.run(_leave, self.name).addErrback(
            lambda f: log.failure("could not remove this node from the registry", f))


# --- one runner at a time ----------------------------------------------------------------------

class SingleRunner:
    """Whether this node runs a single job now (blocking; call it off the reactor)."""

    def __init__(self, db: Database, key: int) -> None:
        self.db = db
        self.key = key
        self._conn = None
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        return self.db.engine.dialect.name == "postgresql"

    def holds(self) -> bool:
        if not self.shared:
            return True
        with self._lock:
            if self._conn is not None:
                try:  # still our connection, still our lock
                    self._conn.execute(text("SELECT 1"))
                    return True
                except Exception:
                    self._drop()
            conn = self.db.engine.connect()
            try:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                   {"key": self.key}).scalar()
                conn.commit()
            except Exception:
                conn.close()
                raise
            if not got:
                conn.close()
                return False
            self._conn = conn
            return True

    def _drop(self) -> None:
        try:
            self._conn.invalidate()
        except Exception:
            pass
        self._conn = None

    def release(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                    self._conn.commit()
                    self._conn.close()
                except Exception:
                    self._drop()
                self._conn = None


# --- calls between nodes -----------------------------------------------------------------------

def _notify(session, channel: str, payload: str) -> None:
    session.execute(text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": channel, "payload": payload})


class NodeBus:
    """Messages between nodes over PostgreSQL ``LISTEN/NOTIFY``.

    ``handlers[op](sender, body)`` answers a call (a value, a Deferred, or an exception with a
    ``code`` the caller sees in ``NodeCallFailed``)."""

    def __init__(self, db: Database, node: str, reactor, call_timeout: float = 10.0) -> None:
        self.db = db
        self.node = node
        self.reactor = reactor
        self.call_timeout = call_timeout
        self.handlers: dict[str, Callable[[str, dict], Any]] = {}
        self._pending: dict[str, defer.Deferred] = {}
        self._ids = itertools.count(1)
        self._last_send: dict[str, defer.Deferred] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening: defer.Deferred = defer.Deferred()

    # the listening thread
    def _conninfo(self) -> str:
        url = self.db.engine.url.set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _listen(self) -> None:
        import psycopg
        first = True
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._conninfo(), autocommit=True) as conn:
                    conn.execute(f'LISTEN "{channel_of(self.node)}"')
                    conn.execute(f'LISTEN "{ALL_NODES}"')
                    if first:
                        self.reactor.callFromThread(self._ready)
                        first = False
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self.reactor.callFromThread(self._received, note.payload)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                self.reactor.callFromThread(
                    log.warn, "node bus: lost its database connection ({why}); listening again "
                    "in 1 s", why=str(exc))
                self._stopping.wait(1.0)

    def _ready(self) -> None:
        if not self.listening.called:
            self.listening.callback(None)

    def start(self) -> defer.Deferred:
        self._thread = threading.Thread(target=self._listen, name="hausmeister-node-bus",
                                        daemon=True)
        self._thread.start()
        return self.listening

    def stop(self) -> None:
        self._stopping.set()
        for d in list(self._pending.values()):
            if not d.called:
                d.errback(NodeCallFailed("stopping", "this node is shutting down"))
        self._pending.clear()

    # sending
    def broadcast(self, op: str, body: dict) -> defer.Deferred:
        """A message to every other node (no answer); failures are logged."""
        return self.send("", {"op": op, "body": body}).addErrback(
            lambda f: log.warn("node bus: could not send {op} to the other nodes: {why}", op=op,
                               why=f.getErrorMessage()))

    def send(self, node: str, message: dict) -> defer.Deferred:
        """``node`` "" is every node (``ALL_NODES``)."""
        payload = json.dumps({**message, "from": self.node}, separators=(",", ":"))
        if len(payload.encode("utf-8")) > MAX_MESSAGE_BYTES:
            return defer.fail(NodeCallFailed("too_large", f"a message to node {node} is larger "
                                             f"than {MAX_MESSAGE_BYTES} bytes"))
        # one after the other per node: the pool's threads would otherwise commit (and so
        # deliver) a party's reports out of order
        outcome: defer.Deferred = defer.Deferred()

        def go(_ignored):
            d = self.db.run(_notify, channel_of(node) if node else ALL_NODES, payload)
            d.addBoth(lambda r: outcome.errback(r) if isinstance(r, Failure)
                      else outcome.callback(r))
            return d.addErrback(lambda _f: None)  # the queue itself never fails
        tail = self._last_send.get(node) or defer.succeed(None)
        self._last_send[node] = tail.addCallback(go)
        return outcome

    def call(self, node: str, op: str, body: dict, timeout: float | None = None) -> defer.Deferred:
        """Ask ``node`` to run ``op``; the Deferred fires with its answer (a dict) or fails with
        ``NodeCallFailed``."""
        call_id = f"{self.node}:{next(self._ids)}"
        answer: defer.Deferred = defer.Deferred()
        self._pending[call_id] = answer
        timer = self.reactor.callLater(timeout or self.call_timeout, self._timed_out, call_id,
                                       node, op)

        def settle(result):
            if timer.active():
                timer.cancel()
            return result
        answer.addBoth(settle)

        def not_sent(failure):
            gone = self._pending.pop(call_id, None)
            if gone is not None and not gone.called:
                if not failure.check(NodeCallFailed):
                    failure = Failure(NodeCallFailed(
                        "unreachable", f"could not reach node {node}: "
                        f"{failure.getErrorMessage()}"))
                gone.errback(failure)
        self.send(node, {"op": op, "call": call_id, "body": body}).addErrback(not_sent)
        return answer

    def tell(self, node: str, op: str, body: dict) -> defer.Deferred:
        """A message that needs no answer; failures are logged."""
        return self.send(node, {"op": op, "body": body}).addErrback(
            lambda f: log.warn("node bus: could not tell node {node} {op}: {why}", node=node,
                               op=op, why=f.getErrorMessage()))

    def _timed_out(self, call_id: str, node: str, op: str) -> None:
        pending = self._pending.pop(call_id, None)
        if pending is not None and not pending.called:
            pending.errback(NodeCallFailed("timeout", f"node {node} did not answer {op} in time"))

    # receiving
    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            op, sender = message["op"], message["from"]
        except (ValueError, KeyError, TypeError):
            log.warn("node bus: dropped an unreadable message ({n} bytes)", n=len(payload))
            return
        if sender == self.node:
            return  # our own broadcast
        if op == "reply":
            pending = self._pending.pop(message.get("call", ""), None)
            if pending is None or pending.called:
                return
            if "error" in message:
                pending.errback(NodeCallFailed(message["error"], message.get("message", "")))
            else:
                pending.callback(message.get("body") or {})
            return
        handler = self.handlers.get(op)
        call_id = message.get("call")
        if handler is None:
            log.warn("node bus: node {sender} sent unknown operation {op}", sender=sender, op=op)
            if call_id:
                self.send(sender, {"op": "reply", "call": call_id, "error": "unknown",
                                   "message": f"unknown operation {op}"})
            return
        d = defer.maybeDeferred(handler, sender, message.get("body") or {})
        if not call_id:
            d.addErrback(lambda f: log.failure("node bus: {op} from {sender} failed", f, op=op,
                                               sender=sender))
            return

        def answered(body):
            return self.send(sender, {"op": "reply", "call": call_id, "body": body or {}})

        def refused(failure):
            code = getattr(failure.value, "code", None) or type(failure.value).__name__
            if isinstance(code, bytes):
                code = code.decode("ascii", "replace")
            return self.send(sender, {"op": "reply", "call": call_id, "error": str(code),
                                      "message": str(failure.value)[:2000]})
        d.addCallbacks(answered, refused).addErrback(
            lambda f: log.failure("node bus: could not answer {op} from {sender}", f, op=op,
                                  sender=sender))


__all__ = ["NodeBus", "NodeRegistry", "NodeCallFailed", "SingleRunner", "OUTBOX_LOCK",
           "claim_dead", "live_nodes", "sessions_on_live_relays"]
