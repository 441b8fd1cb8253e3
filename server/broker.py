"""The broker: ad-hoc nameplates, host presence, and setting up sessions between two modules.

It pairs parties and hands each a single-use relay token; it never carries session bytes (that
is the relay's job) and never sees the secret half of an ad-hoc ID.  Presence lives in memory
(who is connected now) and in the database (last seen, address, version — flushed in batches so
20,000 heartbeating hosts do not mean 20,000 writes; at shutdown all of them go offline in one
transaction, not one per closed connection).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from sqlalchemy import bindparam, select, update
from twisted.internet import defer, task
from protocol.runtime import Logger  # debug() is free when not logged

from protocol import control
from protocol.runtime import run_blocking
from protocol.identity import Identity
from protocol.session_end import BadEndReason, EndCause, EndReason

from . import accounts
from .db import Database
from .db.models import Host, HostGroup, Role, Session, Tenant, User, UserGroup
from .pki import utcnow
from . import storage_health
from .group_commit import GroupCommit
from .session_commit import LockedOut, ProtocolNotWritten, SessionStart, open_sessions
from .session_protocol import ProtocolError, SessionSummary
from .session_recovery import anchor_protocol
from .cluster import NodeCallFailed
from .broker_nodes import (PRESENCE_BATCH_SECONDS, NodeCalls, RemoteParty, _drop_nameplates,
                           _take_nameplate)

#: what a module shows when the server refuses a session it could not record
NOT_RECORDABLE = ("the server cannot record sessions right now (its protocol folder does not take "
                  "writes); the operator has been alerted — try again later")


def host_password_key(supporter: str, host_id: str) -> str:
    # Per supporter and host: guessing locks that supporter out of that host, nobody else.
    return f"hostpw:{supporter}:{host_id}"


def terms_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

log = Logger()

NAMEPLATE_DIGITS = 4


class Connection(Protocol):
    """What the broker needs of a module's control connection (server.module_port)."""

    identity: Identity | None
    address: str
    module_version: str

    def callRemote(self, command, **kwargs) -> defer.Deferred: ...
    def abort(self, reason: str) -> None: ...


@dataclass
class RelayTicket:
    session_id: str
    relay_host: str
    relay_port: int
    relay_token: str
    idle_seconds: float | None = None

    def fields(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "relay_host": self.relay_host,
                "relay_port": self.relay_port, "relay_token": self.relay_token,
                "relay_idle_seconds": self.idle_seconds}


@dataclass
class Nameplate:
    code: str
    supporter: Any  # Connection
    expires_at: float


@dataclass(eq=False)
class HeldOffer:
    """A supporter's offer while a customer's join of ``plate`` is decided: ``plate`` and the
    offer's other nameplates (an ID drawn ahead of the one on offer, RENEW_AHEAD) are out of
    play.  One offer, one customer: the others never come back once the join happened.
    ``released``: the supporter's connection went meanwhile (nothing may be put back)."""
    plate: Nameplate
    others: list[Nameplate]
    released: bool = False

    @property
    def codes(self) -> set[str]:
        return {self.plate.code, *(other.code for other in self.others)}


@dataclass(slots=True)  # one per connected host: no instance dict
class HostPresence:
    connection: Any  # Connection
    host_id: str
    last_heartbeat: float
    tenant_id: int = 0



@dataclass
class LiveSession:
    """A session the broker set up and whose parties may report events for it."""

    session_id: str
    tenant: str
    kind: str
    supporter: Any  # Connection
    peer: Any  # Connection (the customer's or the host's control connection)
    nameplate: str | None = None
    created_at: dt.datetime = field(default_factory=utcnow)
    key_failure_counted: bool = False
    #: the first end reason a party or the server reported (protocol.session_end)
    end: EndReason | None = None
    #: fires when the first reported end reason is in the database
    end_written: defer.Deferred = field(default_factory=lambda: defer.succeed(None))
    #: party reports waiting to be written, in the order they came (``_coalesce``)
    pending: list = field(default_factory=list)
    writing: bool = False
    flushing: bool = False  # write held reports without waiting (the session is ending)
    flushed: list = field(default_factory=list)  # Deferreds fired when the queue is empty
    #: shared events written with one party's report only: (kind, event_id) -> that party.  A
    #: confirmation arriving after the wait is dropped against it instead of becoming a second
    #: line; the oldest are forgotten past ``UNCONFIRMED_KEPT`` (bounded per session)
    unconfirmed: OrderedDict = field(default_factory=OrderedDict)

    @property
    def peer_party(self) -> str:
        return "customer" if self.kind == "adhoc" else "host"

    def party_of(self, conn) -> str | None:
        if conn is self.supporter:
            return "supporter"
        if conn is self.peer:
            return self.peer_party
        return None

    def guess_keys(self) -> list[str]:
        """Lock-out keys a failed key confirmation counts against."""
        if self.kind == "adhoc":
            return [f"adhoc-addr:{self.peer.address}", f"nameplate:{self.nameplate}"]
        return [host_password_key(self.supporter.identity.name, self.peer.identity.name)]

    def summary(self, end: EndReason, bytes_to_peer: int, bytes_to_supporter: int) -> SessionSummary:
        peer = (self.peer.identity.uri if self.peer.identity else f"customer@{self.peer.address}")
        return SessionSummary(self.session_id, self.kind, self.created_at, utcnow(),
                              self.supporter.identity.uri, peer, bytes_to_peer,
                              bytes_to_supporter, end.text()[:200], end.cause.value, end.by)


@dataclass(eq=False)
class PendingEvent:
    """A party's report of a shared event, held until the other party reports the same event
    (same kind and ``event_id``) or ``CONFIRM_SECONDS`` pass: one protocol line per event."""

    kind: str
    detail: dict
    actor: str
    address: str
    parties: set
    deadline: float
    waiters: list = field(default_factory=list)
    shared: bool = True

    def complete(self, now: float) -> bool:
        return not self.shared or len(self.parties) >= 2 or now >= self.deadline


#: how long a report of a shared event waits for the other party's report of it (1 s was too
#: short on a loaded machine: a confirmation 1.x s late became a second line for one event —
#: test_e2e_sessions' file transfer on PostgreSQL in a CI run; the session's end flushes anyway)
CONFIRM_SECONDS = 3.0
#: how many written-but-unconfirmed shared events a session remembers (~15 KB at most; some kinds
#: only one party ever reports, a comment or a shared window).  A confirmation later than that
#: many events would be a line of its own; late ones come seconds late, not 64 events late
UNCONFIRMED_KEPT = 64


@dataclass
class RelayLocator:
    """Which relay a new session uses: the in-process one, or the next separate relay process."""

    internal: tuple[str, Callable[[], int]]
    external: list[tuple[str, int]] = field(default_factory=list)
    idle_seconds: float | None = None   # the relays' idle timeout, told to the modules
    _next: int = 0

    def pick(self) -> tuple[str, int]:
        if not self.external:
            host, port = self.internal
            return host, port()
        choice = self.external[self._next % len(self.external)]
        self._next += 1
        return choice


class Broker(NodeCalls):
    def __init__(self, db: Database, lockouts: accounts.Lockouts, issue_token: Callable[[str, str], str],
                 relays: RelayLocator, reactor, nameplate_ttl: float = 600.0,
                 heartbeat_seconds: float = 30.0, missed_heartbeats: int = 3,
                 flush_seconds: float = 10.0, now: Callable[[], dt.datetime] = utcnow,
                 terms: str = "", protocols: Any = None,
                 blocking: Callable[..., defer.Deferred] = run_blocking) -> None:
        self.db = db
        self.lockouts = lockouts
        self.issue_token = issue_token
        self.relays = relays
        self.reactor = reactor
        self.nameplate_ttl = nameplate_ttl
        self.heartbeat_seconds = heartbeat_seconds
        self.missed_heartbeats = missed_heartbeats
        self.flush_seconds = flush_seconds
        self.now = now
        self.blocking = blocking
        self.terms = terms
        self.protocols = protocols  # server.session_protocol facade, or None (no protocol files)
        #: ends a live session on the in-process relay (set by the server; None with separate
        #: relay processes, which find the server's end request in the database)
        self.end_relay_session: Callable[[str, EndReason], bool] | None = None
        #: why protocols cannot be written now (None: they can); new sessions are refused
        self.protocol_problem: str | None = None
        #: alerts the operator's admins (set by the server when mail is configured)
        self.on_protocol_failure: Callable[[str], None] | None = None
        self.protocol_probe_seconds = 5.0
        self.sessions: dict[str, LiveSession] = {}
        #: ad-hoc starts (lock-out, row, first protocol lines) as group commits
        self.session_starts = GroupCommit(self._open_batch, blocking=blocking)
        self.nameplates: dict[str, Nameplate] = {}
        #: offers whose customer's join is being written (``_hold_offer``)
        self.held_offers: list[HeldOffer] = []
        self.hosts: dict[str, HostPresence] = {}
        #: supporter connection → host ids it was shown by ListHosts (told of their presence)
        self.presence_watchers: dict[Any, set[str]] = {}
        #: several nodes (server.cluster): this node's name, the bus to the others, the nodes
        #: alive at the last look, and the parties connected here of sessions another node set
        #: up (session id -> (that node, the connection))
        self.node: str | None = None
        self.bus: Any = None
        self.live_nodes: set[str] = set()
        self.remote_parties: dict[str, tuple[str, Any]] = {}
        self._presence_out: list[list] = []
        #: hosts whose Hello waits for the next batch write (``host_online``)
        self._arrivals: list[tuple[Any, str, defer.Deferred]] = []
        self._arrivals_writing = False
        self._dirty: set[str] = set()
        self._loops: list[task.LoopingCall] = []
        # Set by stop(): hosts it marked offline in bulk; their connections closing at shutdown
        # write nothing more.  None while running.
        self._marked_offline: set[str] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        self._marked_offline = None
        for fn, interval in ((self._expire, min(5.0, self.heartbeat_seconds)),
                             (self.flush_presence, self.flush_seconds),
                             (self._probe_safely, self.protocol_probe_seconds)):
            loop = task.LoopingCall(fn)
            loop.clock = self.reactor
            loop.start(interval, now=False)
            self._loops.append(loop)
        return self.db.run(_mark_all_offline, self.node)

    def stop(self) -> defer.Deferred:
        """Stop the loops and mark every host connected here offline in one transaction.

        The connections close after this (when the reactor shuts down); writing each host's
        offline row then cost ~3 ms per host (60 s for 20,000) and kept the process from
        exiting while the hosts backed off.  Their heartbeats need no flush: going offline
        sets ``last_seen`` to now.
        """
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        marked = set(self.hosts)
        self._marked_offline = (self._marked_offline or set()) | marked
        self._dirty = set()
        if not marked:
            return defer.succeed(None)
        log.info("stopping: marking {n} connected hosts offline", n=len(marked))
        d = self.db.run(_hosts_went_offline, sorted(marked), self.now(), self.node)
        d.addErrback(lambda f: log.failure("could not record the hosts offline at shutdown", f))
        return d

    def _probe_safely(self) -> defer.Deferred:
        return self.probe_protocols().addErrback(
            lambda f: log.failure("could not probe the protocol folder", f))

    def _expire(self) -> None:
        moment = self.reactor.seconds()
        for code, plate in list(self.nameplates.items()):
            if plate.expires_at <= moment:
                del self.nameplates[code]
                log.info("nameplate {nameplate} expired unused", nameplate=code)
        deadline = self.heartbeat_seconds * self.missed_heartbeats
        for presence in list(self.hosts.values()):
            if moment - presence.last_heartbeat > deadline:
                log.warn("host {host_id} missed {n} heartbeats: dropping its connection",
                         host_id=presence.host_id, n=self.missed_heartbeats)
                presence.connection.abort("missed heartbeats")

    # --- ad-hoc -------------------------------------------------------------------------------

    def allocate_nameplate(self, supporter) -> tuple[str, float]:
        """A random 4-digit nameplate, unique among live ones, for this supporter's connection."""
        self.check_recordable()
        if len(self.nameplates) >= 10 ** NAMEPLATE_DIGITS // 2:
            raise control.WrongState("no free ad-hoc ID right now; try again in a minute")
        while True:
            code = f"{secrets.randbelow(10 ** NAMEPLATE_DIGITS):0{NAMEPLATE_DIGITS}d}"
            if code not in self.nameplates and not self._held(code):
                break
        return self._hold_nameplate(code, supporter)

    def _hold_nameplate(self, code: str, supporter) -> tuple[str, float]:
        self.nameplates[code] = Nameplate(code, supporter,
                                          self.reactor.seconds() + self.nameplate_ttl)
        # debug: a set-up logs at info only when the customer joins and when the session ends
        log.debug("nameplate {nameplate} allocated for {supporter}", nameplate=code,
                 supporter=supporter.identity.uri)
        return code, self.nameplate_ttl

    def _held(self, code: str) -> bool:
        return any(code in held.codes for held in self.held_offers)

    def release_nameplates(self, supporter) -> None:
        released = []
        for code, plate in list(self.nameplates.items()):
            if plate.supporter is supporter:
                del self.nameplates[code]
                released.append(code)
        for held in self.held_offers:  # a join in flight puts none of them back
            if held.plate.supporter is supporter and not held.released:
                held.released = True
                released.extend(other.code for other in held.others)
        if released and self.bus is not None:
            self.db.run(_drop_nameplates, released, self.node).addErrback(
                lambda f: log.failure("could not release nameplates", f))

    @defer.inlineCallbacks
    def join_adhoc(self, customer, nameplate: str):
        keys = (f"adhoc-addr:{customer.address}",)
        if self.bus is not None:  # several nodes: the database row makes the ID single-use
            answer = yield self._join_shared(customer, nameplate, keys)
            return answer
        plate = self.nameplates.get(nameplate)
        if plate is None or plate.expires_at <= self.reactor.seconds():
            self.nameplates.pop(nameplate, None)
            yield self._refuse_join(customer, nameplate, keys)
        # single use: taken before the transaction that checks the lock-out and writes the
        # row, and put back if the lock-out refuses this address
        del self.nameplates[nameplate]
        answer = yield self._join_here(customer, plate, keys)
        return answer

    @defer.inlineCallbacks
    def _join_shared(self, customer, nameplate: str, keys: tuple[str, ...]):
        wait = yield self.db.run(self.lockouts.wait_seconds, keys)
        if wait > 0:
            raise control.LockedOut(_locked_text(wait))
        owner = yield self.db.run(_take_nameplate, nameplate, self.now())
        if owner is not None and owner != self.node:
            answer = yield self._join_elsewhere(owner, customer, nameplate)
            return answer
        plate = self.nameplates.get(nameplate) if owner is not None else None
        if plate is None or plate.expires_at <= self.reactor.seconds():
            self.nameplates.pop(nameplate, None)
            yield self._refuse_join(customer, nameplate, keys)
        del self.nameplates[nameplate]  # single use
        answer = yield self._join_here(customer, plate)
        return answer

    @defer.inlineCallbacks
    def _refuse_join(self, customer, nameplate: str, keys: tuple[str, ...]):
        """An unknown or expired nameplate: one transaction checks the lock-out and, if the
        address is not locked out, counts the failure.  Always raises."""
        locked, wait = yield self.db.run(_count_failed_join, self.lockouts, keys)
        if locked:
            raise control.LockedOut(_locked_text(wait))
        log.warn("unknown or expired nameplate {nameplate} from {address}",
                 nameplate=nameplate, address=customer.address)
        message = "this ID is unknown or expired: check the 8 digits with your supporter"
        if wait:
            message += f"; try again in {max(1, round(wait))} s"
        raise control.UnknownNameplate(message)

    def _hold_offer(self, plate: Nameplate) -> HeldOffer:
        """A customer joins ``plate`` (already out of ``nameplates``): the other nameplates of
        its supporter's connection leave play with it, so a second customer typing the ID
        drawn ahead is refused before any session row is written for a join that cannot
        happen (the supporter's offer takes one customer)."""
        others = [other for other in self.nameplates.values()
                  if other.supporter is plate.supporter]
        for other in others:
            del self.nameplates[other.code]
        held = HeldOffer(plate, others)
        self.held_offers.append(held)
        return held

    def _put_back(self, held: HeldOffer, with_plate: bool) -> None:
        """The join did not happen and the offer still waits: its other nameplates go back
        (``with_plate``: the joined one too; a join the lock-out refused did not use it up).
        Not if the supporter's connection went meanwhile (they would point to a gone
        supporter) or they expired."""
        self.held_offers.remove(held)
        if held.released:
            return
        moment = self.reactor.seconds()
        for plate in ([held.plate] if with_plate else []) + held.others:
            if plate.code not in self.nameplates and plate.expires_at > moment:
                self.nameplates[plate.code] = plate

    def _close_offer(self, held: HeldOffer) -> None:
        """The customer joined (or the supporter could not take them): the offer's other
        nameplates are gone for good, on every node, with any its connection drew while the
        join was written (the next ID drawn ahead of an expiry just then)."""
        self.held_offers.remove(held)
        if held.released:
            return
        late = [plate for plate in self.nameplates.values()
                if plate.supporter is held.plate.supporter]
        for plate in late:
            del self.nameplates[plate.code]
        codes = [other.code for other in held.others + late]
        if not codes:
            return
        log.debug("nameplates {codes} withdrawn: their offer's customer joined with "
                  "{nameplate}", codes=codes, nameplate=held.plate.code)
        if self.bus is not None:
            self.db.run(_drop_nameplates, codes, self.node).addErrback(
                lambda f: log.failure("could not withdraw nameplates", f))

    def _open_batch(self, batch: list[SessionStart]) -> list:
        return open_sessions(self.db, self.protocols, batch)

    @defer.inlineCallbacks
    def _join_here(self, customer, plate: Nameplate, lockout_keys: tuple[str, ...] = ()):
        """The customer (here, or a ``RemoteParty`` on another node) joins this node's
        supporter: the session is set up here.  ``lockout_keys`` are checked in the transaction
        that writes the session row (empty: checked before)."""
        nameplate = plate.code
        supporter = plate.supporter
        held = self._hold_offer(plate)
        session_id = str(uuid.uuid4())
        start = SessionStart(session_id, supporter.identity.name, dict(
            kind="adhoc", supporter_identity=supporter.identity.uri,
            supporter_address=supporter.address, peer_identity=None,
            peer_address=customer.address, host_id=None, node=self.node), lockout_keys, [
            ("created", {"kind": "adhoc", "supporter": supporter.identity.uri,
                         "supporter_address": supporter.address, "nameplate": nameplate}),
            ("joined", {"customer_address": customer.address,
                        "terms_sha256": terms_hash(self.terms)})])
        try:  # no session runs that its protocol cannot record
            tenant = yield self.session_starts.submit(start)
        except ProtocolNotWritten as exc:
            self._put_back(held, with_plate=False)
            live = LiveSession(session_id, exc.tenant, "adhoc", supporter, customer, nameplate)
            end = self._protocol_failed(live, exc.cause)
            yield self._end_early(live, end)
            self.notify_ended(live, end)
            raise control.NotRecordable(NOT_RECORDABLE)
        except Exception:
            self._put_back(held, with_plate=False)
            raise
        if isinstance(tenant, LockedOut):
            self._put_back(held, with_plate=True)
            raise control.LockedOut(_locked_text(tenant.wait))
        live = LiveSession(session_id, tenant, "adhoc", supporter, customer, nameplate)
        relay_host, relay_port = self.relays.pick()
        supporter_ticket = RelayTicket(session_id, relay_host, relay_port,
                                       self.issue_token(session_id, "supporter"),
                                       self.relays.idle_seconds)
        customer_ticket = RelayTicket(session_id, relay_host, relay_port,
                                      self.issue_token(session_id, "peer"),
                                      self.relays.idle_seconds)
        try:
            yield supporter.callRemote(control.SessionReady, nameplate=nameplate,
                                       peer_address=customer.address, **supporter_ticket.fields())
        except Exception as exc:
            self._close_offer(held)
            log.warn("supporter of nameplate {nameplate} is gone: {why}", nameplate=nameplate,
                     why=str(exc))
            yield self._end_early(live, EndReason(EndCause.CONNECTION_LOST, "supporter",
                                                  "gone before the customer joined"))
            raise control.UnknownNameplate("your supporter is no longer waiting: ask for a new ID")
        self._close_offer(held)
        log.info("customer {address} joined nameplate {nameplate}: session {session_id}",
                 address=customer.address, nameplate=nameplate, session_id=session_id)
        self.sessions[session_id] = live
        return {**customer_ticket.fields(), "supporter": supporter.identity.name,
                "terms": self.terms, "supporter_fingerprint": supporter.fingerprint or ""}

    # --- session events -----------------------------------------------------------------------

    def _server_event(self, live: LiveSession, kind: str, detail: dict,
                      strict: bool = False) -> defer.Deferred:
        return self._record(live, kind, "server", "", detail, strict)

    def _server_events(self, live: LiveSession, events: list[tuple[str, dict]]) -> defer.Deferred:
        """Several server lines in one write and one fsync (all on disk, or the caller fails)."""
        if self.protocols is None:
            return defer.succeed(None)
        return self.blocking(self.protocols.record_many, live.tenant, live.session_id,
                             [(kind, "server", "", detail) for kind, detail in events])

    def _record(self, live: LiveSession, kind: str, actor: str, address: str,
                detail: dict, strict: bool = False) -> defer.Deferred:
        """Append a protocol line.  ``strict``: a failure reaches the caller (a session about to
        start is refused); otherwise a failed write ends the running session."""
        if self.protocols is None:
            return defer.succeed(None)
        d = self.blocking(self.protocols.record, live.tenant, live.session_id, kind, actor,
                          address, detail)
        if not strict:
            d.addErrback(self._running_protocol_failed, live)
        return d

    def server_line(self, session_id: str, tenant: str, kind: str, detail: dict) -> defer.Deferred:
        """A line the server writes into a session's protocol for another part of the server (a
        recording's start and SHA-256), also after the session left ``sessions`` but before its
        ``ended`` line.  A failure reaches the caller."""
        if self.protocols is None:
            return defer.succeed(None)
        return self.blocking(self.protocols.record, tenant, session_id, kind, "server", "", detail)

    def _running_protocol_failed(self, failure, live: LiveSession) -> None:
        if failure.check(ProtocolError) and not isinstance(failure.value, OSError):
            # an event the protocol refuses (too large, ...): the reporter's fault, not the disk's
            log.warn("session {session_id}: event refused by the protocol: {why}",
                     session_id=live.session_id, why=str(failure.value))
            raise control.WrongState(str(failure.value))
        end = self._protocol_failed(live, failure.value)
        if live.session_id in self.sessions:
            self.end_by_server(live.session_id, end)
        raise control.NotRecordable(NOT_RECORDABLE)

    def _protocol_failed(self, live: LiveSession, exc: BaseException) -> EndReason:
        """A protocol write failed: remember it (new sessions are refused until the folder takes
        writes again), alert the operator's admins, and name the end reason."""
        why = f"{exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
        self.protocol_problem = f"protocol folder not writable: {why}"[:200]
        log.error("session {session_id}: the session protocol could not be written ({why}); "
                  "new sessions are refused until it can", session_id=live.session_id, why=why)
        if self.on_protocol_failure is not None:
            try:
                self.on_protocol_failure(why)
            except Exception:
                log.failure("could not queue the protocol alert")
        return EndReason(EndCause.PROTOCOL_UNWRITABLE, "server", why[:120])

    def check_recordable(self) -> None:
        """Refuse a new session while the protocol folder failed its last write or probe."""
        if self.protocol_problem is not None:
            raise control.NotRecordable(NOT_RECORDABLE)

    @defer.inlineCallbacks
    def probe_protocols(self):
        """Periodic: does the protocol folder take writes (again)?"""
        if self.protocols is None:
            return
        problem = yield self.blocking(storage_health.probe, self.protocols.protocol_dir)
        if problem is None and self.protocol_problem is not None:
            log.info("the protocol folder takes writes again: new sessions are allowed")
        elif problem is not None and self.protocol_problem is None:
            log.error("{problem}: new sessions are refused until it is fixed", problem=problem)
            if self.on_protocol_failure is not None:
                self.on_protocol_failure(problem)
        self.protocol_problem = problem

    def _end_early(self, live: LiveSession, end: EndReason) -> defer.Deferred:
        """A session that never reached the relay: record its end and close its protocol."""
        self.sessions.pop(live.session_id, None)
        self._tell_forget(live)
        d = self.db.run(_end_session, live.session_id, end)
        if self.protocols is not None:
            d.addCallback(lambda _: self.blocking(self._close_protocol, live, end))
            d.addErrback(lambda f: log.failure("could not close the protocol of session "
                                               "{session_id}", f, session_id=live.session_id))
        return d

    def _close_protocol(self, live: LiveSession, end: EndReason) -> None:
        """In the pool: the ``ended`` line, then its anchor in the session's row."""
        ended = self.protocols.ended(live.tenant, live.summary(end, 0, 0))
        self.db.call(anchor_protocol, live.session_id,
                     self.protocols.file_of(live.tenant, live.session_id), ended)

    def session_event(self, conn, session_id: str, kind: str, detail: dict) -> defer.Deferred:
        """A party's report; stamped with the identity of the connection it came over.  A party
        of a session another node set up reports to that node."""
        live = self.sessions.get(session_id)
        if live is None:
            remote = self.remote_parties.get(session_id)
            if remote is not None and remote[1] is conn and self.bus is not None:
                return self._forward_event(remote[0], session_id, kind, detail)
        if live is None or conn not in (live.supporter, live.peer):
            raise control.Forbidden("you are not a party of this session")
        actor = conn.identity.uri if conn.identity else f"customer@{conn.address}"
        if kind == "ending":
            return self.flush_events(session_id).addCallback(
                lambda _: self._party_ending(live, conn, detail))
        d = self._coalesce(live, kind, actor, conn.address, detail, live.party_of(conn))
        if kind == "key_confirmation_failed" and not live.key_failure_counted:
            live.key_failure_counted = True  # both sides report it; it is one guess
            keys = live.guess_keys()
            d.addCallback(lambda _: self.db.run(self.lockouts.failed, keys))
            log.warn("session {session_id}: key confirmation failed (wrong code or password); "
                     "counted against {keys}", session_id=session_id, keys=", ".join(keys))
        return d.addCallback(lambda _: {})

    # --- one protocol line per event --------------------------------------------------------

    def _coalesce(self, live: LiveSession, kind: str, actor: str, address: str, detail: dict,
                  party: str | None) -> defer.Deferred:
        """Both parties report what they both saw (a right granted, an emergency stop, a file
        received), each with the same ``event_id``.  The first report waits for the second; the
        line written names the other party under ``confirmed_by``.  Reports without an
        ``event_id`` queue behind them, so the timeline keeps the order the events came in."""
        waiter: defer.Deferred = defer.Deferred()
        event_id = detail.get("event_id")
        if isinstance(event_id, str) and event_id:
            reported_by = live.unconfirmed.get((kind, event_id))
            if reported_by is not None and reported_by != party:
                # the other party's report of an event already written: it is that line
                del live.unconfirmed[(kind, event_id)]
                log.debug("session {session_id}: late confirmation of {kind} {event_id} by the "
                          "{party} (after {wait} s; the line is already written): dropped",
                          session_id=live.session_id, kind=kind, event_id=event_id,
                          party=party, wait=CONFIRM_SECONDS)
                return defer.succeed(None)
            for entry in live.pending:
                if (entry.shared and entry.kind == kind and entry.detail.get("event_id") == event_id
                        and party not in entry.parties):
                    entry.parties.add(party)
                    entry.detail = {**entry.detail, "confirmed_by": actor}
                    entry.waiters.append(waiter)
                    self._drain(live)
                    return waiter
            deadline = self.reactor.seconds() + CONFIRM_SECONDS
            live.pending.append(PendingEvent(kind, dict(detail), actor, address, {party},
                                             deadline, [waiter]))
            self.reactor.callLater(CONFIRM_SECONDS, self._drain, live)
        else:
            live.pending.append(PendingEvent(kind, dict(detail), actor, address, {party}, 0.0,
                                             [waiter], shared=False))
        self._drain(live)
        return waiter

    def _drain(self, live: LiveSession, force: bool = False) -> None:
        """Write the head of the queue when it is complete, one line at a time (in order)."""
        if live.writing or not live.pending:
            return
        head = live.pending[0]
        if not (force or head.complete(self.reactor.seconds())):
            return
        live.pending.pop(0)
        live.writing = True
        if head.shared and len(head.parties) < 2:
            self._remember_unconfirmed(live, head)
        d = self._record(live, head.kind, head.actor, head.address, head.detail)

        def written(result, failed: bool):
            live.writing = False
            for waiter in head.waiters:
                waiter.callback(None) if not failed else waiter.errback(result)
            self._drain(live, force=live.flushing)
            if not live.pending and not live.writing:
                flushed, live.flushed = live.flushed, []
                for done in flushed:
                    done.callback(None)
        d.addCallbacks(written, written, callbackArgs=(False,), errbackArgs=(True,))

    @staticmethod
    def _remember_unconfirmed(live: LiveSession, head: PendingEvent) -> None:
        """Keep the key of a shared event written with one report (bounded, oldest out)."""
        (party,) = head.parties
        live.unconfirmed[(head.kind, head.detail["event_id"])] = party
        if len(live.unconfirmed) > UNCONFIRMED_KEPT:
            (kind, event_id), _ = live.unconfirmed.popitem(last=False)
            log.debug("session {session_id}: forgot unconfirmed {kind} {event_id} (the oldest "
                      "of {count})", session_id=live.session_id, kind=kind, event_id=event_id,
                      count=UNCONFIRMED_KEPT)

    def flush_events(self, session_id: str) -> defer.Deferred:
        """Write every held report now (before the session's end is recorded)."""
        live = self.sessions.get(session_id)
        if live is None or (not live.pending and not live.writing):
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        live.flushed.append(done)
        live.flushing = True
        self._drain(live, force=True)
        return done

    def _party_ending(self, live: LiveSession, conn, detail: dict) -> defer.Deferred:
        """A party says why it ends the session, before it closes its relay leg; the first
        reason heard is the one the ``ended`` line, the session list and the CSV show."""
        try:
            end = EndReason.from_fields(detail)
        except BadEndReason as exc:
            raise control.WrongState(f"bad end reason: {exc}")
        if end.by not in ("supporter", live.peer_party):
            raise control.WrongState(f"an end reason of this session names the supporter or the "
                                     f"{live.peer_party}, not {end.by!r}")
        if live.end is None:
            live.end = end
            log.info("session {session_id} ending: {reason} (reported by the {party})",
                     session_id=live.session_id, reason=end.text(), party=live.party_of(conn))
            live.end_written = self.db.run(_report_end, live.session_id, end).addErrback(
                lambda f: log.failure("could not record why session {session_id} ends", f,
                                      session_id=live.session_id))
        # every answer waits until the first reason is in the row: a party closes its leg after
        # the answer, and a separate relay process reads the reason from the row
        written: defer.Deferred = defer.Deferred()
        live.end_written.addBoth(lambda result: (written.callback(None), result)[1])
        return written.addCallback(lambda _: {})

    def end_by_server(self, session_id: str, end: EndReason) -> defer.Deferred:
        """The server ends a live session (revocation, unwritable protocol): the reason goes
        into the row first (a separate relay process reads it from there), both parties are told
        with ``SessionEnded``, then the in-process relay closes the legs."""
        live = self.sessions.get(session_id)
        if live is not None and live.end is None:
            live.end = end
        d = self.db.run(_report_end, session_id, end, True)
        d.addErrback(lambda f: log.failure("could not record the end of session {session_id}",
                                           f, session_id=session_id))

        def tell_and_close(_):
            if live is not None:
                self.notify_ended(live, end)
            if self.end_relay_session is not None:
                self.end_relay_session(session_id, end)
        return d.addCallback(tell_and_close)

    def notify_ended(self, live: LiveSession, end: EndReason) -> None:
        for conn in (live.supporter, live.peer):
            try:
                conn.callRemote(control.SessionEnded, session_id=live.session_id,
                                text=end.text(), **end.fields())
            except Exception as exc:  # the connection is already gone
                log.debug("could not tell {party} that session {session_id} ended: {why}",
                          party=live.party_of(conn), session_id=live.session_id, why=str(exc))

    def sessions_of_serials(self, serials: set[str]) -> list[tuple[LiveSession, Any]]:
        """Live sessions one of whose parties connected with a certificate in ``serials``."""
        found = []
        for live in list(self.sessions.values()):
            for conn in (live.supporter, live.peer):
                if getattr(conn, "serial", None) in serials:
                    found.append((live, conn))
                    break
        return found

    def session_ended(self, session_id: str) -> None:
        """The relay closed the session (its protocol is closed where the relay records the end)."""
        live = self.sessions.pop(session_id, None)
        if live is not None:
            self._tell_forget(live)

    def _forget_sessions_of(self, conn) -> None:
        # A party's control connection is gone: it can report nothing more for its sessions;
        # what it reported is written first.
        for session_id, live in list(self.sessions.items()):
            if conn is live.supporter or (conn is live.peer and live.kind == "adhoc"):
                self.flush_events(session_id)
                del self.sessions[session_id]
                self._tell_forget(live)
        for session_id, (_node, party) in list(self.remote_parties.items()):
            if party is conn:
                del self.remote_parties[session_id]

    # --- hosts --------------------------------------------------------------------------------

    def host_online(self, conn, module_version: str) -> defer.Deferred:
        """Record the host online; fires with its tenant's name (the Hello answer needs it).

        Hellos are written in batches: one transaction for every host that said Hello while
        the previous batch was being written (a quiet server writes each at once; thousands
        coming back after a restart share a few hundred transactions instead of one each)."""
        waiter: defer.Deferred = defer.Deferred()
        self._arrivals.append((conn, module_version, waiter))
        if not self._arrivals_writing:
            self._write_arrivals()
        return waiter

    def _write_arrivals(self) -> None:
        batch, self._arrivals = self._arrivals, []
        self._arrivals_writing = True
        rows = [(conn.identity.name, conn.address, version) for conn, version, _ in batch]
        # Core, not an ORM session: at a ramp of first connects each Hello is a batch of its own,
        # and the session's set-up, bookkeeping and commit were ~1.9 M instructions of a 9.3 M
        # registration (bench/registration_instructions.py)
        d = self.db.run_core(_hosts_came_online, rows, self.now(), self.node)

        def written(found: list) -> None:
            for (conn, _, waiter), came in zip(batch, found):
                try:
                    tenant = self._came_online(conn, came)
                except Exception:
                    waiter.errback()
                else:
                    waiter.callback(tenant)

        def failed(failure) -> None:
            for _, _, waiter in batch:
                waiter.errback(failure)

        def next_batch(_) -> None:
            self._arrivals_writing = False
            if self._arrivals:
                self._write_arrivals()
        d.addCallbacks(written, failed).addBoth(next_batch)

    def _came_online(self, conn, came) -> str:
        host_id = conn.identity.name
        if came is None:
            raise control.NotEnrolled("this host is not known to the server: enroll it again")
        tenant_id, tenant_name, elsewhere = came
        if elsewhere and self.bus is not None:  # the newest connection wins on every node
            self.bus.tell(elsewhere, "drop_host", {"host_id": host_id})
        old = self.hosts.get(host_id)
        if old is not None and old.connection is not conn:
            log.warn("host {host_id} connected again from {address}: the newest connection wins",
                     host_id=host_id, address=conn.address)
            old.connection.abort("replaced by a newer connection of the same host")
        self.hosts[host_id] = HostPresence(conn, host_id, self.reactor.seconds(), tenant_id)
        if self._marked_offline is not None:
            # registered while stopping: stop()'s bulk write did not cover this connection
            self._marked_offline.discard(host_id)
        log.info("host {host_id} online from {address} ({version}, serial {serial})",
                 host_id=host_id, address=conn.address,
                 version=getattr(conn, "module_version", ""), serial=getattr(conn, "serial", None))
        self._tell_presence(host_id, True, conn.address)
        return tenant_name

    def heartbeat(self, conn) -> None:
        if conn.identity is not None and conn.identity.role == "host":
            presence = self.hosts.get(conn.identity.name)
            if presence is not None and presence.connection is conn:
                presence.last_heartbeat = self.reactor.seconds()
                self._dirty.add(presence.host_id)

    def connection_lost(self, conn) -> None:
        self._forget_sessions_of(conn)
        if conn.identity is None:
            return
        if conn.identity.role == "supporter":
            self.release_nameplates(conn)
            self.presence_watchers.pop(conn, None)
            return
        presence = self.hosts.get(conn.identity.name)
        if presence is not None and presence.connection is conn:
            del self.hosts[conn.identity.name]
            self._dirty.discard(conn.identity.name)
            if self._marked_offline is not None and conn.identity.name in self._marked_offline:
                return  # stop() has written it offline already
            log.info("host {host_id} offline", host_id=conn.identity.name)
            self._tell_presence(conn.identity.name, False, conn.address)
            self.db.run(_host_went_offline, conn.identity.name, self.now(),
                        self.node).addErrback(
                lambda f: log.failure("could not record host offline", f))

    def flush_presence(self) -> defer.Deferred:
        dirty, self._dirty = self._dirty, set()
        if not dirty:
            return defer.succeed(None)
        d = self.db.run(_touch_hosts, sorted(dirty), self.now())
        d.addErrback(lambda f: log.failure("could not record host presence", f))
        return d

    @defer.inlineCallbacks
    def list_hosts(self, supporter):
        rows = yield self.db.run(_visible_hosts, supporter.identity.name)
        hosts = []
        for host, group_name in rows:
            online = host.id in self.hosts or self._online_elsewhere(host)
            hosts.append({"host_id": host.id, "name": host.name, "group": group_name or "",
                          "online": online,
                          "last_seen": host.last_seen.isoformat() if host.last_seen else "",
                          "address": host.last_address or "",
                          "module_version": host.module_version or ""})
        hosts.sort(key=lambda h: (not h["online"], h["name"].lower(), h["host_id"]))
        self.presence_watchers[supporter] = {h["host_id"] for h in hosts}
        return hosts

    def _tell_presence(self, host_id: str, online: bool, address: str) -> None:
        """Push a host's new presence to the supporters whose list shows it (no polling); with
        several nodes to those of the other nodes too (batched: one message per quarter
        second, not one per host when thousands come back after a restart)."""
        seen = self.now().isoformat()
        self.push_presence(host_id, online, seen, address)
        if self.bus is not None:
            self._presence_out.append([host_id, online, seen, address or ""])
            if len(self._presence_out) == 1:
                self.reactor.callLater(PRESENCE_BATCH_SECONDS, self._send_presence)

    def push_presence(self, host_id: str, online: bool, seen: str, address: str) -> None:
        """Tell this node's supporters whose list shows the host."""
        for conn, shown in list(self.presence_watchers.items()):
            if host_id in shown:
                try:
                    conn.callRemote(control.HostPresenceChanged, host_id=host_id, online=online,
                                    last_seen=seen, address=address or "")
                except Exception as exc:  # the supporter is going away
                    log.debug("could not tell {who} about host {host_id}: {why}",
                              who=conn.address, host_id=host_id, why=str(exc))

    @defer.inlineCallbacks
    def connect_host(self, supporter, wanted: str):
        rows = yield self.db.run(_visible_hosts, supporter.identity.name)
        matches = [h for h, _ in rows if h.id == wanted] or [h for h, _ in rows if h.name == wanted]
        if not matches:
            raise control.UnknownHost(f"no host {wanted!r} that you may reach "
                                      "(see `hausmeister-supporter hosts`)")
        if len(matches) > 1:
            raise control.UnknownHost(f"{len(matches)} hosts are named {wanted!r}: use the host id")
        host = matches[0]
        self.check_recordable()
        wait = yield self.db.run(self.lockouts.wait_seconds,
                                 [host_password_key(supporter.identity.name, host.id)])
        if wait > 0:
            raise control.LockedOut(f"too many wrong passwords for host {host.name!r}: try again "
                                    f"in {max(1, round(wait))} s")
        presence = self.hosts.get(host.id)
        if presence is not None:
            party = presence.connection
        elif self._online_elsewhere(host):  # another node holds the host: offer it through that
            party = RemoteParty(self, host.node, Identity("host", host.id),
                                host.last_address or "")
        else:
            seen = f"; last seen {host.last_seen:%Y-%m-%d %H:%M} UTC" if host.last_seen else ""
            raise control.HostOffline(f"host {host.name!r} is offline{seen}")
        session_id = str(uuid.uuid4())
        tenant = yield self.db.run(_create_session, dict(
            id=session_id, kind="host", supporter_identity=supporter.identity.uri,
            supporter_address=supporter.address, peer_identity=f"hausmeister:host:{host.id}",
            peer_address=party.address, host_id=host.id, node=self.node),
            supporter.identity.name)
        live = LiveSession(session_id, tenant, "host", supporter, party)
        try:  # no session runs that its protocol cannot record
            yield self._server_event(live, "created", {
                "kind": "host", "supporter": supporter.identity.uri,
                "supporter_address": supporter.address, "host_id": host.id, "host_name": host.name,
                "host_address": party.address}, strict=True)
        except Exception as exc:
            yield self._end_early(live, self._protocol_failed(live, exc))
            raise control.NotRecordable(NOT_RECORDABLE)
        self.sessions[session_id] = live
        relay_host, relay_port = self.relays.pick()
        host_ticket = RelayTicket(session_id, relay_host, relay_port,
                                  self.issue_token(session_id, "peer"),
                                  self.relays.idle_seconds)
        try:
            if isinstance(party, RemoteParty):
                party.session_id = session_id
                answer = yield self.bus.call(party.node, "offer", {
                    "host_id": host.id, "supporter": supporter.identity.name,
                    "supporter_fingerprint": supporter.fingerprint or "", **host_ticket.fields()})
                party.address, party.fingerprint = answer["address"], answer["fingerprint"]
                party.serial = answer["serial"] or None
                log.info("host {host_id} is on node {node}: offered through it",
                         host_id=host.id, node=party.node)
            else:
                answer = yield party.callRemote(
                    control.OfferSession, supporter=supporter.identity.name,
                    supporter_fingerprint=supporter.fingerprint or "", **host_ticket.fields())
        except Exception as exc:
            yield self._end_early(live, EndReason(EndCause.CONNECTION_LOST, "host",
                                                  f"did not answer the offer: {exc}"[:120]))
            if isinstance(exc, NodeCallFailed) and exc.code in ("timeout", "unreachable"):
                raise control.HostOffline(
                    f"host {host.name!r} did not answer: its server node {party.node} did not "
                    f"answer in time (it may be down); try again in a minute")
            raise control.HostOffline(f"host {host.name!r} did not answer: {exc}")
        if not answer["accepted"]:
            yield self._end_early(live, EndReason(EndCause.DECLINED, "host"))
            raise control.Forbidden(f"host {host.name!r} declined the session")
        try:
            yield self._server_event(live, "joined", {"host_id": host.id}, strict=True)
        except Exception as exc:
            end = self._protocol_failed(live, exc)
            yield self._end_early(live, end)
            self.notify_ended(live, end)
            raise control.NotRecordable(NOT_RECORDABLE)
        log.info("{supporter} connects to host {host_id}: session {session_id}",
                 supporter=supporter.identity.uri, host_id=host.id, session_id=session_id)
        ticket = RelayTicket(session_id, relay_host, relay_port,
                             self.issue_token(session_id, "supporter"),
                             self.relays.idle_seconds)
        return {**ticket.fields(), "host_id": host.id, "host_name": host.name,
                "host_fingerprint": party.fingerprint or ""}


# --- database work (runs in the blocking pool) -------------------------------------------------

def _locked_text(wait: float) -> str:
    return f"too many wrong IDs from your address: try again in {max(1, round(wait))} s"


def _count_failed_join(session, lockouts: accounts.Lockouts, keys) -> tuple[bool, float]:
    """(locked out already, seconds to wait): a locked-out address's attempt is not counted."""
    wait = lockouts.wait_seconds(session, keys)
    if wait > 0:
        return True, wait
    return False, lockouts.failed(session, keys)





def _held_by(node: str | None):
    """Hosts whose control connection this node holds (one node: every host)."""
    return Host.node.is_(None) if node is None else Host.node == node


def _mark_all_offline(session, node: str | None = None) -> None:
    session.execute(update(Host).where(Host.online.is_(True), _held_by(node))
                    .values(online=False))


_HOSTS = Host.__table__
_TENANTS = Tenant.__table__
#: built once: a statement built per call spent more on its construction and cache key than
#: SQLite on running it (py-spy, registrations one after the other)
_ARRIVING = (select(_HOSTS.c.id, _HOSTS.c.tenant_id, _HOSTS.c.online, _HOSTS.c.node,
                    _TENANTS.c.name)
             .select_from(_HOSTS.outerjoin(_TENANTS, _TENANTS.c.id == _HOSTS.c.tenant_id))
             .where(_HOSTS.c.id.in_(bindparam("b_ids", expanding=True))))
_CAME_ONLINE = (update(_HOSTS).where(_HOSTS.c.id == bindparam("b_id"))
                .values(online=True, node=bindparam("b_node"), last_seen=bindparam("b_seen"),
                        last_address=bindparam("b_address"),
                        module_version=bindparam("b_version")))


def _hosts_came_online(connection, arrivals: list[tuple[str, str, str]], moment,
                       node: str | None = None) -> list[tuple[int, str, str | None] | None]:
    """Mark hosts online here, in one transaction (``Database.call_core``): for each (host id,
    address, module version) its (tenant id, tenant name, the other node that held it until
    now), or None if it is not enrolled.  One SELECT per 1,000 hosts and one executemany
    UPDATE."""
    ids = sorted({host_id for host_id, _, _ in arrivals})
    known: dict[str, tuple] = {}
    for start in range(0, len(ids), IN_BATCH):
        for host_id, tenant_id, online, held_by, tenant_name in connection.execute(
                _ARRIVING, {"b_ids": ids[start:start + IN_BATCH]}):
            known[host_id] = (tenant_id, tenant_name or "",
                              held_by if online and held_by not in (None, node) else None)
    found = [known.get(host_id) for host_id, _, _ in arrivals]
    updates = {host_id: {"b_id": host_id, "b_node": node, "b_seen": moment,
                         "b_address": address, "b_version": version[:40]}
               for host_id, address, version in arrivals if host_id in known}
    if updates:
        connection.execute(_CAME_ONLINE, list(updates.values()))
    return found


def _host_went_offline(session, host_id: str, moment, node: str | None = None) -> None:
    host = session.get(Host, host_id)
    if host is not None and host.node == node:  # not when it came back on another node already
        host.online = False
        host.last_seen = moment


# ids per UPDATE ... WHERE id IN (...): well below SQLite's and PostgreSQL's parameter limits
IN_BATCH = 1000


def _update_hosts(session, host_ids: list[str], **values) -> None:
    for start in range(0, len(host_ids), IN_BATCH):
        batch = host_ids[start:start + IN_BATCH]
        session.execute(update(Host).where(Host.id.in_(batch)).values(**values))


def _hosts_went_offline(session, host_ids: list[str], moment, node: str | None = None) -> None:
    for start in range(0, len(host_ids), IN_BATCH):
        batch = host_ids[start:start + IN_BATCH]
        session.execute(update(Host).where(Host.id.in_(batch), _held_by(node))
                        .values(online=False, last_seen=moment))


def _touch_hosts(session, host_ids: list[str], moment) -> None:
    _update_hosts(session, host_ids, last_seen=moment)


def _supporter(session, user_name: str) -> User:
    user = session.scalar(select(User).where(User.name == user_name))
    if user is None or user.disabled:
        raise control.Forbidden(f"user {user_name!r} is disabled or gone")
    if user.role == Role.auditor:
        raise control.Forbidden("auditors cannot start sessions")
    return user


def _visible_hosts(session, user_name: str) -> list[tuple[Host, str | None]]:
    """Hosts of the supporter's tenant, narrowed to its groups when it has any (admins: all)."""
    user = _supporter(session, user_name)
    query = (select(Host, HostGroup.name).outerjoin(HostGroup, Host.group_id == HostGroup.id)
             .where(Host.tenant_id == user.tenant_id))
    if user.role != Role.admin:
        groups = list(session.scalars(select(UserGroup.group_id).where(UserGroup.user_id == user.id)))
        if groups:
            query = query.where(Host.group_id.in_(groups))
    return [(host, group) for host, group in session.execute(query)]


def _create_session(session, values: dict, supporter_name: str) -> str:
    user = _supporter(session, supporter_name)
    session.add(Session(tenant_id=user.tenant_id, created_at=utcnow(), started_at=utcnow(),
                        bytes_to_peer=0, bytes_to_supporter=0, **values))
    return user.tenant.name


def _end_session(session, session_id: str, end: EndReason) -> None:
    row = session.get(Session, session_id)
    if row is not None and row.ended_at is None:
        row.ended_at = utcnow()
        row.end_reason = end.text()[:200]
        row.end_cause, row.ended_by = end.cause.value, end.by


def _report_end(session, session_id: str, end: EndReason, server: bool = False) -> None:
    """Keep the first reported end reason of a running session (the server's overrides a
    party's: a revocation or an unwritable protocol is what ended it)."""
    row = session.get(Session, session_id)
    if row is None or row.ended_at is not None:
        return
    if row.end_cause is None or (server and row.ended_by != "server"):
        row.end_reason = end.text()[:200]
        row.end_cause, row.ended_by = end.cause.value, end.by


__all__ = ["Broker", "RelayLocator", "RelayTicket"]
